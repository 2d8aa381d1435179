"""Reference decoder-only LLMs in plain NumPy: the ground truth for models compiled onto the simulated chip::

    ModelConfig, SHAPES, model_config   shapes of the llama, mixtral and gpt2 families (named: gpt2, llama2-7b,
                                        llama3-8b, mixtral-8x7b, ..., and tiny test models)
    random_weights, RandomWeights       a deterministic weight set with O(1) activations (RandomWeights makes
                                        each tensor from its name when it is read)
    save_pretrained, load_pretrained    Hugging Face directories (config.json + safetensors; needs
                                        ``pip install lpucore[llm]``, imported only when called); a bad
                                        directory raises ModelError naming the file and key (load_config
                                        reads config.json alone)
    quantize_int8, dequantize_int8      per-output-channel symmetric int8
    Reference                           prefill / decode / generate over a KV cache (float32 arithmetic)
    Decoder                             the same models compiled onto the simulated chip, token by token, with
                                        weights and KV cache resident in SRAM (decoder.py, program.py)
    prefill.ChunkProgram                a prompt prefilled in chunks of positions, one program run per chunk,
                                        the rows as matrix products (prefill.py; Decoder(prefill_chunk=N))
    Decoder.generate / Decoder.chat     token ids or text in (text and chat with a model directory's
                                        tokenizer.json, ``pip install lpucore[text]``); GenerateResult out
    SamplingParams, Sampler             greedy, or seeded sampling with temperature, top_k, top_p: on the host,
                                        from the chip's logits, no chip cycles (sampling.py)
    Tokenizer, TextStream               a directory's tokenizer and chat template; one sequence's tokens as
                                        text, streamed (text.py)
    Continuation                        one sequence's host side: sampler, text stream, EOS and stop strings
                                        (continuation.py; one per sequence of a batch)
    PipelineDecoder                     a Decoder's model as pipeline stages over chips of an lpucore.System,
                                        cut by SRAM bytes, big blocks in shards, one compile per distinct
                                        stage (pipeline.py)
    predict, Prediction                 a model too big to simulate whole: its first layers simulated and
                                        checked, the whole model's step derived from them (predict.py)

The reference modules (reference, shapes, weights) do not use lpucore's compiler: they are what the compiled
models are checked against.
"""

from ..errors import ModelError
from .continuation import Continuation
from .decoder import Decoder, DecodeStats, GenerateResult, ModelDoesNotFit, StepStats
from .pipeline import PipelineDecoder
from .predict import Prediction, predict
from .reference import Reference
from .sampling import Sampler, SamplingError, SamplingParams
from .shapes import SHAPES, ModelConfig, model_config
from .text import TextError, TextStream, Tokenizer
from .weights import (
    RandomWeights,
    dequantize_int8,
    load_config,
    load_pretrained,
    quantize_int8,
    random_weights,
    save_pretrained,
)

__all__ = ["ModelConfig", "SHAPES", "model_config", "random_weights", "RandomWeights", "load_pretrained",
           "load_config", "save_pretrained", "ModelError", "quantize_int8", "dequantize_int8", "Reference",
           "Decoder", "DecodeStats", "GenerateResult", "StepStats", "ModelDoesNotFit", "PipelineDecoder",
           "predict", "Prediction", "SamplingParams", "Sampler", "SamplingError", "Tokenizer", "TextStream",
           "TextError", "Continuation"]
