#!/usr/bin/env bash
# The engine tests and the fuzz tests against a build of the engine with AddressSanitizer and
# UndefinedBehaviorSanitizer: an out-of-bounds access, a use after free or undefined behaviour
# (signed overflow, a bad shift, ...) in src_pyx/ stops the test with the sanitizer's report.
#
#   tools/asan.sh                 # the engine tests and tests/test_fuzz.py (several minutes)
#   tools/asan.sh tests/test_c2c.py -k link      # other pytest arguments instead
#   LPUCORE_FUZZ_EXAMPLES=2000 tools/asan.sh      # a longer fuzz run under the sanitizers
#   tools/asan.sh --campaign --cases 50000        # the fuzz campaign (python -m lpucore.testing.fuzz ARGS)
#                                                 # against the sanitized engine: a report aborts the worker,
#                                                 # which the campaign counts as a crash and saves the input
#
# The extension is built with CFLAGS/LDFLAGS -fsanitize=address,undefined -fno-omit-frame-pointer
# in a scratch copy of the working tree (the engine built in place is untouched), and Python runs
# with the ASan runtime preloaded (LD_PRELOAD=$(gcc -print-file-name=libasan.so): CPython itself is
# not instrumented) and leak detection off (ASAN_OPTIONS=detect_leaks=0: CPython keeps objects
# alive until exit by design). Needs gcc with libasan/libubsan. Exit status: pytest's (or the campaign's).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

libasan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "tools/asan.sh: gcc has no libasan.so (install the compiler's sanitizer runtime)" >&2
    exit 2
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# tracked and untracked (not ignored) files: the working tree as it is
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$scratch"
san="-fsanitize=address,undefined -fno-omit-frame-pointer -g"
echo "==> building the engine with ${san} in ${scratch}"
(cd "$scratch" && CC=gcc LDSHARED="gcc -shared" CFLAGS="$san" LDFLAGS="$san" \
    python setup.py -q build_ext --inplace >/dev/null)

campaign=0
if [ "${1:-}" = "--campaign" ]; then
    campaign=1
    shift
elif [ $# -eq 0 ]; then
    set -- tests/test_units.py tests/test_mxm_sxm.py tests/test_c2c.py tests/test_driver.py \
        tests/test_snapshot_hostile.py tests/test_fuzz.py
fi
if [ "$campaign" = 1 ]; then
    echo "==> python -m lpucore.testing.fuzz $* (sanitized engine)"
else
    echo "==> pytest $* (sanitized engine)"
fi
cd "$scratch"
LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$scratch" python -c "import lpucore._engine as e, sys; \
assert e.__file__.startswith('$scratch'), e.__file__" || { echo "not the scratch build" >&2; exit 2; }
export LD_PRELOAD="$libasan"
# allocator_may_return_null=1: an allocation too big to make returns NULL (NumPy raises MemoryError, as
# without ASan) instead of aborting: tests feed files whose headers claim arrays of 2**62 bytes
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$scratch"
if [ "$campaign" = 1 ]; then
    python -m lpucore.testing.fuzz "$@"
else
    python -m pytest -q -p no:cacheprovider -n "${ASAN_JOBS:-2}" "$@"
fi
