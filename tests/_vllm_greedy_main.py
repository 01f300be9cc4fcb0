"""Child-process script: greedy tokens from vLLM's offline engine (stdlib + vllm only).

    python _vllm_greedy_main.py REQUEST.json RESULT.json

REQUEST: ``{"model": DIR, "dtype": "float32", "max_model_len": 512, "max_new_tokens": 16,
"prompts": [[token ids], ...]}``. RESULT: ``{"tokens": [[ids], ...], "logprobs": [[float], ...]}``
(logprob of each chosen token). Run as a file, not imported: vLLM spawns workers, so the engine is
only built under the ``__main__`` guard, and the interpreter may be a venv without nemoforge.
"""

import json
import sys


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(request_path) as f:
        req = json.load(f)
    llm = LLM(
        model=req["model"],
        trust_remote_code=True,
        dtype=req["dtype"],
        max_model_len=req["max_model_len"],
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"], ignore_eos=True, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]], params)
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append(
            [lp[tok].logprob for tok, lp in zip(completion.token_ids, completion.logprobs, strict=True)]
        )
    with open(result_path, "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
