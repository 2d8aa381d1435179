/* The fast engine's helper thread: MXM batch products computed beside the cycle loop.
 *
 * A batch's product is not needed until its rows land (mxm_delay cycles after their ABC)
 * and an accumulator is read, often hundreds of simulated cycles later.  So the loop
 * hands a big batch to a job and goes on; a helper thread packs the weights into the
 * job's own buffer and multiplies straight into the plane's product FIFO.  The job
 * reads the batch's activations and the installed weight slot where they are: the loop
 * stages the next batches into other buffers of a per-plane ring, and before it reuses
 * a ring buffer or lets LW rewrite a weight slot, it waits for the jobs that read it
 * (lpu_pool_wait_upto).  The loop waits for a job's products only when it applies a
 * FIFO row the job fills; a waiting loop runs still-queued jobs itself.  Every return
 * from the loop drains all jobs, so no job outlives a run() call.  Who computes a row
 * changes nothing in it: the kernels are the same, so results are identical with or
 * without the helper.
 */
#ifndef LPU_JOBS_H
#define LPU_JOBS_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lpu_kernels.h"

#define LPU_JOB_I8 0       /* int8 rows by the VNNI kernel */
#define LPU_JOB_F32 1      /* fp32-mode float16 rows by the float32 kernel */
#define LPU_JOB_I8_AVX2 2  /* int8 rows by the AVX2 kernel */

#define LPU_JOB_FREE 0
#define LPU_JOB_QUEUED 1
#define LPU_JOB_RUNNING 2
#define LPU_JOB_DONE 3

typedef struct {
    int kind, n, L, kk, cc;
    int64_t seq;           /* submission number, to tell a recycled job from the one waited for */
    float **orow;          /* [rows]: where row i's L products go (FIFO rows) */
    const uint8_t *x;      /* activations (a ring buffer): n rows of L offset bytes or L floats */
    const uint8_t *wsrc;   /* the installed weight slot: L rows of L bytes */
    void *w;               /* the weights in the kernel's layout (the job's own) */
    int32_t *corr;         /* int8 (VNNI): 128 x column sums; int8 (AVX2): the kernel's scratch */
    int state;             /* LPU_JOB_*, read and written with atomics */
} lpu_job;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    pthread_t th;
    int started, stop, failed;
    pid_t pid;             /* the process that started the thread: a fork's child has none */
    int nj, rows;
    int delay_us;          /* tests: the helper thread sleeps this long before each job, so that
                            * a loop that does not wait for it reads or rewrites too early */
    int64_t next_seq;
    lpu_job *jobs;
} lpu_pool;

static void lpu_job_run(lpu_job *j)
{
    int L = j->L, K = L / 2;
    if (j->kind == LPU_JOB_I8_AVX2) {
        lpu_avx2_pack((const int8_t *)j->wsrc, L, L, (int16_t *)j->w);
        for (int i = 0; i < j->n; i += LPU_AVX2_ROWS) {
            int m = j->n - i < LPU_AVX2_ROWS ? j->n - i : LPU_AVX2_ROWS;
            lpu_avx2_rows(j->x + (int64_t)i * L, L, m, (const int16_t *)j->w, L, L, j->orow + i, j->corr);
        }
        return;
    }
    if (j->kind == LPU_JOB_I8) {
        lpu_vnni_pack((const int8_t *)j->wsrc, L, L, (int8_t *)j->w, j->corr);
    } else {
        lpu_f16w_to_f32(j->wsrc, L, (float *)j->w, &j->kk, &j->cc);
        /* all-zero weight padding is skipped unless an activation is inf or NaN */
        if ((j->kk < K || j->cc < L) && lpu_f32_special((const float *)j->x, L, j->n, K)) {
            j->kk = K;
            j->cc = L;
        }
    }
    for (int i = 0; i < j->n; i += 4) {
        int m = j->n - i < 4 ? j->n - i : 4;
        if (j->kind == LPU_JOB_I8)
            lpu_vnni_rows(j->x + (int64_t)i * L, L, m, (const int8_t *)j->w, j->corr, L, L, j->orow + i);
        else
            lpu_f32_rows((const float *)j->x + (int64_t)i * L, L, m, (const float *)j->w, j->kk, L, j->cc,
                         j->orow + i);
    }
}

/* The oldest queued job, or NULL (call with mu held). */
static lpu_job *lpu_pool_next(lpu_pool *P)
{
    lpu_job *best = NULL;
    for (int k = 0; k < P->nj; k++) {
        lpu_job *j = &P->jobs[k];
        if (j->state == LPU_JOB_QUEUED && (best == NULL || j->seq < best->seq))
            best = j;
    }
    return best;
}

/* Run job j (queued, mu held) on this thread; returns with mu held. */
static void lpu_pool_run_here(lpu_pool *P, lpu_job *j)
{
    __atomic_store_n(&j->state, LPU_JOB_RUNNING, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&P->mu);
    lpu_job_run(j);
    pthread_mutex_lock(&P->mu);
    __atomic_store_n(&j->state, LPU_JOB_DONE, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&P->cv_done);
}

static void *lpu_pool_main(void *arg)
{
    lpu_pool *P = (lpu_pool *)arg;
    pthread_mutex_lock(&P->mu);
    while (!P->stop) {
        lpu_job *j = lpu_pool_next(P);
        if (j == NULL) {
            pthread_cond_wait(&P->cv_work, &P->mu);
            continue;
        }
        if (P->delay_us > 0) {
            /* RUNNING while asleep, so that the loop cannot take it over */
            __atomic_store_n(&j->state, LPU_JOB_RUNNING, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&P->mu);
            usleep((useconds_t)P->delay_us);
            pthread_mutex_lock(&P->mu);
        }
        lpu_pool_run_here(P, j);
    }
    pthread_mutex_unlock(&P->mu);
    return NULL;
}

/* Set up a pool of nj jobs of up to rows rows each (buffers and thread come with
 * lpu_pool_start).  0 on success. */
static int lpu_pool_init(lpu_pool *P, int nj, int rows)
{
    memset(P, 0, sizeof(*P));
    P->nj = nj;
    P->rows = rows;
    if (pthread_mutex_init(&P->mu, NULL) || pthread_cond_init(&P->cv_work, NULL) || pthread_cond_init(&P->cv_done, NULL))
        return 1;
    return 0;
}

/* Allocate the jobs' buffers and start the thread; 0 on success (else the caller
 * computes synchronously). */
static int lpu_pool_start(lpu_pool *P, int64_t w_bytes, int64_t corr_ints)
{
    if (P->started && P->pid == getpid())
        return 0;
    if (P->failed)
        return 1;
    if (P->started) {
        /* the child of a fork (between runs, so no job is pending): the thread stayed
         * behind and the lock may have been copied held */
        P->started = 0;
        P->failed = 1;
        if (pthread_mutex_init(&P->mu, NULL) || pthread_cond_init(&P->cv_work, NULL) ||
            pthread_cond_init(&P->cv_done, NULL) || pthread_create(&P->th, NULL, lpu_pool_main, P))
            return 1;
        P->pid = getpid();
        P->failed = 0;
        P->started = 1;
        return 0;
    }
    P->failed = 1;
    P->jobs = (lpu_job *)calloc((size_t)P->nj, sizeof(lpu_job));
    if (P->jobs == NULL)
        return 1;
    for (int k = 0; k < P->nj; k++) {
        lpu_job *j = &P->jobs[k];
        j->orow = (float **)malloc((size_t)P->rows * sizeof(float *));
        j->w = aligned_alloc(64, (size_t)((w_bytes + 63) / 64 * 64));
        j->corr = (int32_t *)aligned_alloc(64, (size_t)((corr_ints * 4 + 63) / 64 * 64));
        if (j->orow == NULL || j->w == NULL || j->corr == NULL)
            return 1;
    }
    if (pthread_create(&P->th, NULL, lpu_pool_main, P))
        return 1;
    P->pid = getpid();
    P->failed = 0;
    P->started = 1;
    return 0;
}

/* A free job to fill (waiting for, or running, older ones if all are busy).  The
 * pool's jobs are acquired, submitted and waited for by one thread, the loop's. */
static lpu_job *lpu_pool_acquire(lpu_pool *P)
{
    pthread_mutex_lock(&P->mu);
    for (;;) {
        for (int k = 0; k < P->nj; k++) {
            int st = P->jobs[k].state;
            if (st == LPU_JOB_FREE || st == LPU_JOB_DONE) {
                /* a wait for its last submission now finds the number changed: done */
                P->jobs[k].state = LPU_JOB_FREE;
                P->jobs[k].seq = -1;
                pthread_mutex_unlock(&P->mu);
                return &P->jobs[k];
            }
        }
        lpu_job *j = lpu_pool_next(P);
        if (j != NULL)
            lpu_pool_run_here(P, j);
        else
            pthread_cond_wait(&P->cv_done, &P->mu);
    }
}

/* Queue a filled job; returns its submission number. */
static int64_t lpu_pool_submit(lpu_pool *P, lpu_job *j)
{
    pthread_mutex_lock(&P->mu);
    j->seq = P->next_seq++;
    __atomic_store_n(&j->state, LPU_JOB_QUEUED, __ATOMIC_RELAXED);
    pthread_cond_signal(&P->cv_work);
    pthread_mutex_unlock(&P->mu);
    return j->seq;
}

/* Return once job k's submission seq is done (a recycled job means it is).  While the
 * helper runs it, this thread runs the oldest queued job, if any, rather than sleep: when
 * products are slower than the loop (the AVX2 kernel), the loop waits for the job the
 * helper took, and the jobs queued behind it would otherwise wait for one thread. */
static void lpu_pool_wait(lpu_pool *P, int k, int64_t seq)
{
    lpu_job *j = &P->jobs[k];
    if (__atomic_load_n(&j->state, __ATOMIC_ACQUIRE) == LPU_JOB_DONE && j->seq == seq)
        return;
    pthread_mutex_lock(&P->mu);
    while (j->seq == seq && j->state != LPU_JOB_DONE) {
        lpu_job *o = j->state == LPU_JOB_QUEUED ? j : lpu_pool_next(P);
        if (o != NULL)
            lpu_pool_run_here(P, o);
        else
            pthread_cond_wait(&P->cv_done, &P->mu);
    }
    pthread_mutex_unlock(&P->mu);
}

/* Return once every job submitted as number seq or earlier is done (this thread runs
 * the queued ones): jobs finish out of order when the loop runs one it waits for. */
static void lpu_pool_wait_upto(lpu_pool *P, int64_t seq)
{
    if (seq < 0)
        return;
    pthread_mutex_lock(&P->mu);
    for (;;) {
        lpu_job *busy = NULL;
        for (int k = 0; k < P->nj; k++) {
            lpu_job *j = &P->jobs[k];
            if ((j->state == LPU_JOB_QUEUED || j->state == LPU_JOB_RUNNING) && j->seq <= seq &&
                (busy == NULL || j->state == LPU_JOB_QUEUED))
                busy = j;
        }
        if (busy == NULL)
            break;
        if (busy->state == LPU_JOB_QUEUED)
            lpu_pool_run_here(P, busy);
        else
            pthread_cond_wait(&P->cv_done, &P->mu);
    }
    pthread_mutex_unlock(&P->mu);
}

/* Return once every submitted job is done (this thread runs the queued ones). */
static void lpu_pool_drain(lpu_pool *P)
{
    if (!P->started || P->pid != getpid())
        return;
    pthread_mutex_lock(&P->mu);
    for (;;) {
        int busy = 0;
        for (int k = 0; k < P->nj; k++)
            busy |= P->jobs[k].state == LPU_JOB_QUEUED || P->jobs[k].state == LPU_JOB_RUNNING;
        if (!busy)
            break;
        lpu_job *j = lpu_pool_next(P);
        if (j != NULL)
            lpu_pool_run_here(P, j);
        else
            pthread_cond_wait(&P->cv_done, &P->mu);
    }
    pthread_mutex_unlock(&P->mu);
}

static void lpu_pool_destroy(lpu_pool *P)
{
    if (P->started && P->pid == getpid()) {
        lpu_pool_drain(P);
        pthread_mutex_lock(&P->mu);
        P->stop = 1;
        pthread_cond_broadcast(&P->cv_work);
        pthread_mutex_unlock(&P->mu);
        pthread_join(P->th, NULL);
        P->started = 0;
    }
    if (P->jobs != NULL) {
        for (int k = 0; k < P->nj; k++) {
            free(P->jobs[k].orow);
            free(P->jobs[k].w);
            free(P->jobs[k].corr);
        }
        free(P->jobs);
        P->jobs = NULL;
    }
    pthread_cond_destroy(&P->cv_work);
    pthread_cond_destroy(&P->cv_done);
    pthread_mutex_destroy(&P->mu);
}

#endif
