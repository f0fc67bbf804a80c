"""Which CPU operations give other bits on another machine: a fingerprint (a hash of the output bits) of each kind of
work one SmolLM2-shaped LoRA training step does, under alignkit's CPU numerics (alignkit.numerics, applied before
torch loads), to compare between machines. A diagnostic for issue 15, not a test: Intel and AMD CPUs agree on the
forward pass of the smol SFT step and differ in its gradients; comparing two machines' files names the operations.

    python bench/numerics_fingerprint.py --out bench/results/numerics_fingerprint_amd.json
    python bench/numerics_fingerprint.py --compare bench/results/numerics_fingerprint_amd.json
    python bench/numerics_fingerprint.py --sweep --compare bench/results/numerics_fingerprint_amd.json

`--sweep` reruns the fingerprint, each in a fresh process (MKL reads its setting once, when it loads), under every
MKL code branch (`MKL_CBWR`: AUTO, COMPATIBLE, SSE4_2, AVX, AVX2, AVX512, with and without STRICT) at 1 and 2
threads, and says for each how many operations differ from the other machine's file (MKL's fixed branches apply to
Intel CPUs only; on AMD every setting but COMPATIBLE runs AUTO). On an Intel Xeon no branch gives the AMD EPYC's bits:
AVX2,STRICT differs in exp and the score head's matrix-vector products only, which AMD computes as Intel's AVX branch
does (bench/results/intel/amd_mkl.json; bench/amd_mkl.sh runs a pipeline so). CI (`.ci/run`) prints the comparison.

Inputs are made from integers (no random generator, whose vectorised paths could themselves differ), at the shapes
of SmolLM2-135M (hidden 576, intermediate 1536, 9 heads of 64, vocabulary 49152) and 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
importlib.import_module("alignkit")  # applies alignkit.numerics: before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import machine  # noqa: E402  bench/machine.py: the script's own folder is on sys.path

TOKENS, HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, VOCAB, RANK = 320, 576, 1536, 9, 64, 49152, 16


def tensor(*shape: int, salt: int = 0, scale: float = 0.05) -> torch.Tensor:
    """Deterministic values in [-scale, scale) from integer arithmetic: the same bits on every machine."""
    n = 1
    for s in shape:
        n *= s
    ints = (torch.arange(n, dtype=torch.int64) * 2654435761 + salt * 97) % 10007
    return ((ints.to(torch.float64) / 10007 - 0.5) * 2 * scale).to(torch.float32).reshape(shape)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprints() -> dict[str, str]:
    out = {}
    x = tensor(TOKENS, HIDDEN, salt=1, scale=1.0)
    for name, (n_out, n_in) in {"q": (HIDDEN, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE),
                                "lm_head": (VOCAB, HIDDEN)}.items():
        w = tensor(n_out, n_in, salt=2)
        a = x if n_in == HIDDEN else tensor(TOKENS, n_in, salt=3, scale=1.0)
        y = a @ w.t()  # forward, NT
        g = tensor(TOKENS, n_out, salt=4, scale=0.01)
        out[f"matmul_forward_{name}"] = digest(y)
        out[f"matmul_input_grad_{name}"] = digest(g @ w)  # NN
        out[f"matmul_weight_grad_{name}"] = digest(g.t() @ a)  # TN: the long reduction is over tokens
    w = tensor(1, HIDDEN, salt=14)  # a reward model's score head: one output, a matrix-vector product
    out["matmul_forward_score"] = digest(x @ w.t())
    g = tensor(TOKENS, 1, salt=15, scale=0.01)
    out["matmul_input_grad_score"] = digest(g @ w)
    out["matmul_weight_grad_score"] = digest(g.t() @ x)
    q, k = (tensor(HEADS, TOKENS, HEAD_DIM, salt=s, scale=1.0) for s in (16, 17))
    scores = torch.bmm(q, k.transpose(1, 2))  # eager attention's batched products
    out["bmm_attention_scores"] = digest(scores)
    out["bmm_attention_values"] = digest(torch.bmm(torch.softmax(scores, -1), k))
    lora_a, lora_b = tensor(RANK, HIDDEN, salt=5), tensor(HIDDEN, RANK, salt=6)
    out["matmul_lora_down"] = digest(x @ lora_a.t())
    out["matmul_lora_up"] = digest((x @ lora_a.t()) @ lora_b.t())
    out["matmul_lora_weight_grad"] = digest(tensor(TOKENS, HIDDEN, salt=7).t() @ (x @ lora_a.t()))
    logits = tensor(TOKENS, VOCAB, salt=8, scale=8.0)
    out["log_softmax_vocab"] = digest(torch.log_softmax(logits, -1))
    out["softmax_vocab"] = digest(torch.softmax(logits, -1))
    out["logsumexp_vocab"] = digest(torch.logsumexp(logits, -1))
    for fn in ("exp", "log1p", "tanh", "sigmoid", "rsqrt"):
        out[fn] = digest(getattr(torch, fn)(x if fn != "rsqrt" else x.abs() + 1e-3))
    out["silu"] = digest(F.silu(x))
    out["rms_norm"] = digest(F.rms_norm(x, (HIDDEN,), tensor(HIDDEN, salt=9, scale=1.0), 1e-5))
    out["sum_rows"] = digest(x.sum(-1))
    out["sum_columns"] = digest(x.sum(0))
    out["norm"] = digest(torch.linalg.vector_norm(x))
    q, k, v = (tensor(1, HEADS, TOKENS, HEAD_DIM, salt=s, scale=1.0).requires_grad_() for s in (10, 11, 12))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out["sdpa_forward"] = digest(att)
    att.backward(tensor(1, HEADS, TOKENS, HEAD_DIM, salt=13, scale=0.01))
    out["sdpa_grad_q"], out["sdpa_grad_k"], out["sdpa_grad_v"] = (digest(t.grad) for t in (q, k, v))
    return out


def differing(ops: dict[str, str], other: dict) -> list[str]:
    """The operations whose fingerprint differs from `other`'s (a fingerprint file's record)."""
    return sorted(k for k in ops if other["ops"].get(k) != ops[k])


MKL_BRANCHES = ("AUTO", "COMPATIBLE", "SSE4_2", "AVX", "AVX2", "AVX512", "AVX2,STRICT", "AVX512,STRICT")


def sweep(reference: str) -> None:
    """The fingerprint under every MKL branch and 1 and 2 threads, each in a fresh process, against `reference`."""
    import subprocess

    other = json.load(open(reference))
    print(f"MKL branches on this CPU against {other['cpu']} ({reference}): operations that differ")
    for branch in MKL_BRANCHES:
        for threads in (1, 2):
            env = {**os.environ, "MKL_CBWR": branch}
            env.pop("ALIGNKIT_CPU_NUMERICS", None)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(threads)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  MKL_CBWR={branch:<14} threads={threads}: failed: {done.stderr.strip()[-300:]}")
                continue
            ops = json.loads(done.stdout)["ops"]
            differ = differing(ops, other)
            print(f"  MKL_CBWR={branch:<14} threads={threads}: {len(differ):2d} of {len(ops)}"
                  + (f": {', '.join(differ)}" if differ else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write this machine's fingerprints here")
    p.add_argument("--compare", help="a fingerprint file from another machine: list what differs")
    p.add_argument("--sweep", action="store_true", help="every MKL branch and 1/2 threads against --compare's file")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.sweep:
        if not args.compare:
            p.error("--sweep needs --compare FILE")
        sweep(args.compare)
        return 0
    torch.set_num_threads(args.threads)
    from alignkit.numerics import in_effect

    record = {"cpu": machine.cpu_name(), "numerics": in_effect()["cpu"], "MKL_CBWR": os.environ.get("MKL_CBWR"),
              "threads": args.threads, "torch": torch.__version__, "ops": fingerprints()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
    if args.compare:
        other = json.load(open(args.compare))
        differ = differing(record["ops"], other)
        print(f"{record['cpu']} vs {other['cpu']}: {len(differ)} of {len(record['ops'])} operations differ")
        for k in differ:
            print(f"  {k}")
        return 1 if differ else 0
    if not args.out:
        print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
