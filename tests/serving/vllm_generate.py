"""Greedy completions of an artifact with vLLM's offline `LLM`, as JSON on stdout.

Runs in the vLLM virtual environment, where svdforge is not installed:
    python vllm_generate.py ARTIFACT MAX_NEW_TOKENS PROMPT [PROMPT ...]
prints one line `RESULT {"token_ids": [[...], ...], "text": [...]}` (vLLM logs to stdout
too). vLLM spawns its engine process, hence the `__main__` guard.
"""
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    path, n, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(model=path, trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=1 << 28,
              seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    print("\nRESULT " + json.dumps({"token_ids": [list(o.outputs[0].token_ids) for o in outs],
                      "text": [o.outputs[0].text for o in outs]}), flush=True)


if __name__ == "__main__":
    main()
