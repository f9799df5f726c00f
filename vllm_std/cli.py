"""The `vllm-std` command: `demo`, `bench`, `calibrate`, `doctor`, `fixture`."""

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from vllm_std.demo import run_demo

    return run_demo(args)


def _doctor(args: argparse.Namespace) -> int:
    from vllm_std.doctor import run

    return run()


def _bench(args: argparse.Namespace) -> int:
    from vllm_std.bench.command import run

    return run(args)


def _calibrate(args: argparse.Namespace) -> int:
    from vllm_std.calibration import run_calibrate

    return run_calibrate(args)


def _fixture(args: argparse.Namespace) -> int:
    if args.family == "sparse":
        from vllm_std.fixtures.sparse import sparse_model

        print(sparse_model(retrain=args.retrain))
        return 0
    if args.family == "sparse-spread":
        from vllm_std.fixtures.spread import spread_model

        print(spread_model())
        return 0
    from vllm_std.fixtures.models import tiny_model

    print(tiny_model(args.family))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-std", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="STD on the trained look-up fixture: lossless, faster, and why selection matters"
    )
    from vllm_std.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="compare STD with no speculation, ngram and baseline selections")
    from vllm_std.bench.command import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_bench)

    calibrate = sub.add_parser("calibrate", help="measure a cost profile for adaptive gamma and save it")
    from vllm_std.calibration import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=_calibrate)

    sub.add_parser("doctor", help="check that this environment can run vllm-std").set_defaults(func=_doctor)

    fixture = sub.add_parser("fixture", help="build (or find) a tiny checkpoint and print its folder")
    fixture.add_argument(
        "family",
        choices=["qwen2_vl", "qwen2_5_vl", "llava_onevision", "sparse", "sparse-spread"],
        help="a random-weight family, `sparse`: the Qwen2-VL trained on the look-up task (shipped with "
        "the package), or `sparse-spread`: that model with its logits scaled down, so that sampled requests "
        "meet spread distributions",
    )
    fixture.add_argument(
        "--retrain",
        action="store_true",
        help="sparse only: train it anew here (about 30 minutes on 2 cores) into the fixture cache instead "
        "of using the shipped checkpoint; pass the printed folder to `vllm-std bench --model`",
    )
    fixture.set_defaults(func=_fixture)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
