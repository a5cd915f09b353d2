"""Serve a checkpoint in vLLM (CPU) and print greedy tokens with their logprobs as one JSON line.

Run with the vLLM virtualenv's interpreter (``scripts/vllm_venv.sh``), never the project's: this process must not
import peqa_peft, which proves the checkpoint stands on its own.

    VLLM_CPU_KVCACHE_SPACE=1 python tests/workers/vllm_worker.py DIR float16,bfloat16 '[[ids...], ...]' NEW_TOKENS

Prompts are token ids (no tokenizer in the comparison). For each dtype (one engine after the other) and prompt the
output holds the generated ids and, per step, the logprob vLLM computed for that id (``logprobs=0``: the sampled
token only, from the model's logits before any processing). The ``__main__`` guard is required: vLLM's engine core
starts its worker by spawning a process that re-imports this file.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model_dir, dtypes, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    begin = time.perf_counter()
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    result = {"import_s": time.perf_counter() - begin}
    for dtype in dtypes.split(","):
        start = time.perf_counter()
        llm = LLM(
            model=model_dir,
            dtype=dtype,
            max_model_len=256,
            enforce_eager=True,  # no graph capture or compilation: shorter start-up, same kernels
            seed=0,
        )
        started = time.perf_counter() - start  # engine ready: model loaded, KV cache allocated, workers up
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        entry = {"startup_s": started, "tokens": [], "logprobs": []}
        for out in outputs:
            completion = out.outputs[0]
            entry["tokens"].append(list(completion.token_ids))
            entry["logprobs"].append(
                [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs, strict=True)]
            )
        entry["total_s"] = time.perf_counter() - start
        result[dtype] = entry
        llm.llm_engine.engine_core.shutdown()  # stop this engine's processes before starting the next one
        del llm
        gc.collect()
    assert "peqa_peft" not in sys.modules, "the vLLM process imported peqa_peft"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
