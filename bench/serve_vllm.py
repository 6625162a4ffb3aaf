"""vLLM side of bench/serve.py; runs in vLLM's venv (no svdforge). Prints `RESULT {json}`.

    python serve_vllm.py SPEC_JSON
SPEC: {"models": {label: {"path":..., "impl": "auto"|"transformers"}}, "runs", "prefill",
"new_tokens", "batches", "threads"}. The engines are built first, then every measurement
alternates between them run by run (interleaved), medians taken by the caller.
"""
import json
import sys
import time


def _rss_tree_bytes() -> int:
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def _timed(llm, prompts, params) -> float:
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.argv[1])
    engines, rss = {}, {}
    for label, m in spec["models"].items():
        before = _rss_tree_bytes()
        engines[label] = LLM(model=m["path"], trust_remote_code=True, dtype="float32", enforce_eager=True,
                             max_model_len=spec["prefill"] + spec["new_tokens"] + 64,
                             kv_cache_memory_bytes=1 << 29, seed=0, model_impl=m["impl"],
                             enable_prefix_caching=False)
        rss[label] = _rss_tree_bytes() - before
    prefill = [TokensPrompt(prompt_token_ids=list(range(10, 10 + spec["prefill"])))]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    decode = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    rows = {label: {"prefill_s": [], **{f"decode_b{b}_s": [] for b in spec["batches"]}} for label in engines}
    for llm in engines.values():  # warm-up
        _timed(llm, prefill, one)
    for _ in range(spec["runs"]):
        for label, llm in engines.items():
            rows[label]["prefill_s"].append(_timed(llm, prefill, one))
            for b in spec["batches"]:
                prompts = [TokensPrompt(prompt_token_ids=list(range(20 + i, 52 + i))) for i in range(b)]
                rows[label][f"decode_b{b}_s"].append(_timed(llm, prompts, decode))
    print("\nRESULT " + json.dumps({"times": rows, "rss_delta_bytes": rss, "peak_rss_tree_bytes": _rss_tree_bytes()}),
          flush=True)


if __name__ == "__main__":
    main()
