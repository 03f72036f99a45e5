"""One rank of a TP2 decode over a tiny model folder, for the liveness tests (run as a script, one process per
rank, with or without the deepspeed launcher).

    python tests/distributed/decode_rank.py FOLDER READY_DIR [--exit-after STEPS]

Builds the engine (init_distributed: the peer watch, signal handlers, the collective timeout), writes
READY_DIR/rank<R>.pid once decoding, and decodes one long request. `--exit-after N`: this rank ends with
`os._exit(7)` after N decode steps (a crash that runs no cleanup). Any error ends it with one
`error: [rank R] ...` line and exit status 1.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("ready_dir")
    parser.add_argument("--exit-after", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=0)       # the deepspeed launcher passes it
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    from seesaw_ds import SamplingParams
    from seesaw_ds.distributed.builder import build_engine
    from seesaw_ds.distributed.liveness import say_fatal
    from seesaw_ds.engine.config import EngineConfig
    try:
        engine = build_engine(EngineConfig(model=args.folder, dtype="float32", parallel="TP2", block_size=8,
                                           max_model_len=1024, kv_device_gb=0.01))
        engine.add_request("0", list(range(2, 30)), SamplingParams(max_tokens=1000, ignore_eos=True))
        rank, steps = int(os.environ["RANK"]), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 2:
                with open(os.path.join(args.ready_dir, f"rank{rank}.pid"), "w") as f:
                    f.write(str(os.getpid()))
            if args.exit_after and steps >= args.exit_after:
                os._exit(7)
        engine.close()
    except Exception as err:  # noqa: BLE001 - the test reads this one line
        say_fatal(f"{type(err).__name__}: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
