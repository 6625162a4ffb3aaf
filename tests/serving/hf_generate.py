"""Load an artifact with plain transformers, as a user without svdforge would, and print JSON.

    python hf_generate.py ARTIFACT N_TOKENS PROMPT_IDS_JSON [--block-svdforge]

With --block-svdforge, any import of svdforge fails (the test's proof that the folder needs
only torch and transformers). Prints {"loading_info", "logits", "greedy", "without_remote_code"}.
"""
import json
import sys


class _Blocker:
    """A meta-path finder that refuses the svdforge package."""

    def find_spec(self, name, path=None, target=None):
        if name == "svdforge" or name.startswith("svdforge."):
            raise ImportError(f"{name} is blocked: the artifact must load without svdforge")
        return None


def greedy(model, ids, n):
    import torch

    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0].tolist()


def main() -> None:
    if "--block-svdforge" in sys.argv:
        sys.meta_path.insert(0, _Blocker())
        sys.argv.remove("--block-svdforge")
    import torch
    from transformers import AutoModelForCausalLM

    path, n, ids = sys.argv[1], int(sys.argv[2]), torch.tensor([json.loads(sys.argv[3])])
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True,
                                                       dtype=torch.float32)
    model.eval()
    try:
        AutoModelForCausalLM.from_pretrained(path)
        refused = None
    except ValueError as e:
        refused = " ".join(str(e).split())
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    print("\n" + json.dumps({"loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "class": type(model).__name__, "logits": logits.tolist(), "greedy": greedy(model, ids, n),
                      "without_remote_code": refused,
                      "svdforge_importable": "svdforge" in sys.modules}))


if __name__ == "__main__":
    main()
