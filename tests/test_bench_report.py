"""`make bench`'s report: the request path's targets checked from a run's figures, and the command
line that repeats part of a run. Runs from hand-made measurements: no process is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.loadgen import WORKLOADS, Measurement
from bench.report import Check, Run

CONCURRENCY = 32
CHECK_KEYS = [
    "cpu_per_call_unary_100B",
    "cpu_per_call_unary_64KiB",
    "p99_c1_unary_100B",
    "cpu_per_message_server_stream",
    "cpu_per_message_bidi_pingpong",
    "cpu_per_message_bidi_pipelined",
    "added_p50_c1_unary_100B",
    "cpu_per_call_broker-connect_vs_broker",
    "cpu_per_call_broker-connect_vs_bare",
    "cpu_per_call_broker-rest_vs_broker",
    "cpu_per_call_broker-rest_vs_bare",
]
MESSAGES_PER_STREAM_CALL = next(w.messages for w in WORKLOADS if w.key == "server_stream")


def measurement(
    target: str,
    workload: str,
    concurrency: int,
    cpu_us: float | None = 100.0,
    p50_ms: float = 1.0,
    p99_ms: float = 2.0,
    errors: int = 0,
    units: int = 1000,
) -> Measurement:
    messages = units * (MESSAGES_PER_STREAM_CALL if workload == "server_stream" else 1)
    return Measurement(
        target=target,
        workload=workload,
        concurrency=concurrency,
        seconds=1.0,
        units=units,
        messages=messages,
        errors=errors,
        error="UNAVAILABLE: the provider went away" if errors else "",
        per_s=float(units),
        messages_per_s=float(messages),
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        proxy_cpu_us=cpu_us,
        provider_cpu_us=50.0,
    )


def make_run(
    *measurements: Measurement, targets: tuple[str, ...] = ("direct", "bare", "broker")
) -> Run:
    run = Run(
        command="BENCH_SECONDS=1 bench/run.py",
        seconds=1.0,
        concurrency=CONCURRENCY,
        generators=2,
        workloads=WORKLOADS,
        targets={name: f"the {name} target" for name in targets},
        machine={
            "nproc": 2,
            "cpu": "test",
            "kernel": "test",
            "python": "3.11",
            "grpcio": "test",
            "date": "today",
            "code": "abc1234",
        },
    )
    run.measurements.extend(measurements)
    return run


def full_run(broker_cpu: float = 110.0, broker_p99_c1: float = 3.0) -> Run:
    """Every target every workload measures, with the broker's figures as given."""
    out: list[Measurement] = []
    for w in WORKLOADS:
        levels = [1] if w.one_stream else [1, CONCURRENCY]
        for c in levels:
            out.append(measurement("direct", w.key, c, cpu_us=None, p50_ms=0.5, p99_ms=1.0))
            out.append(measurement("bare", w.key, c, cpu_us=100.0, p50_ms=1.0, p99_ms=2.0))
            out.append(
                measurement("broker", w.key, c, cpu_us=broker_cpu, p50_ms=1.2, p99_ms=broker_p99_c1)
            )
    return make_run(*out)


def check(run: Run, key: str) -> Check:
    return next(c for c in run.checks() if c.key == key)


def test_every_target_of_the_issue_is_checked_in_a_fixed_order() -> None:
    assert [c.key for c in full_run().checks()] == CHECK_KEYS


def test_cpu_per_unary_call_within_stretch_meets_both() -> None:
    run = full_run(broker_cpu=115.0)
    for key in ("cpu_per_call_unary_100B", "cpu_per_call_unary_64KiB"):
        c = check(run, key)
        assert c.value == pytest.approx(1.15)
        assert (c.met, c.stretch_met) == (True, True)
        assert c.target == "<= 1.3x (stretch <= 1.15x)"
        assert c.figures == {"broker_cpu_us_per_call": 115.0, "bare_cpu_us_per_call": 100.0}


def test_cpu_per_unary_call_between_stretch_and_target_meets_only_the_target() -> None:
    c = check(full_run(broker_cpu=125.0), "cpu_per_call_unary_100B")
    assert (c.met, c.stretch_met) == (True, False)
    assert c.verdict == "MET; stretch not met"


def test_cpu_per_unary_call_over_target_is_not_met() -> None:
    c = check(full_run(broker_cpu=199.0), "cpu_per_call_unary_100B")
    assert (c.met, c.stretch_met) == (False, False)
    assert "1.99x (broker 199 µs, bare 100 µs)" in c.shown
    assert "NOT MET" in c.line()


def test_cpu_per_call_is_read_under_load_not_at_concurrency_one() -> None:
    run = make_run(
        measurement("bare", "unary_64KiB", 1, cpu_us=100.0),
        measurement("broker", "unary_64KiB", 1, cpu_us=500.0),
        measurement("bare", "unary_64KiB", CONCURRENCY, cpu_us=100.0),
        measurement("broker", "unary_64KiB", CONCURRENCY, cpu_us=120.0),
    )
    assert check(run, "cpu_per_call_unary_64KiB").value == pytest.approx(1.2)


def test_p99_is_compared_at_concurrency_one() -> None:
    run = make_run(
        measurement("bare", "unary_100B", 1, p99_ms=1.5),
        measurement("broker", "unary_100B", 1, p99_ms=2.9),
        measurement("bare", "unary_100B", CONCURRENCY, p99_ms=60.0),
        measurement("broker", "unary_100B", CONCURRENCY, p99_ms=600.0),
    )
    c = check(run, "p99_c1_unary_100B")
    assert c.value == pytest.approx(2.9 / 1.5)
    assert c.met is True
    assert c.figures == {"broker_p99_ms_c1": 2.9, "bare_p99_ms_c1": 1.5}


def test_p99_over_twice_bare_is_not_met() -> None:
    c = check(full_run(broker_p99_c1=4.1), "p99_c1_unary_100B")
    assert c.met is False
    assert c.target == "<= 2x"


def test_server_streaming_cpu_is_per_message_not_per_call() -> None:
    # 100 messages per call: 10,400 µs per call is 104 µs per message.
    run = make_run(
        measurement("bare", "server_stream", CONCURRENCY, cpu_us=10_000.0),
        measurement("broker", "server_stream", CONCURRENCY, cpu_us=10_400.0),
    )
    c = check(run, "cpu_per_message_server_stream")
    assert c.figures == {"broker_cpu_us_per_msg": 104.0, "bare_cpu_us_per_msg": 100.0}
    assert c.value == pytest.approx(1.04)
    assert c.met is True
    assert run.summary()["server_stream"]["broker"]["proxy_cpu_us_per_msg"] == 104.0


@pytest.mark.parametrize("workload", ["bidi_pingpong", "bidi_pipelined"])
def test_each_bidi_workload_is_held_to_five_percent(workload: str) -> None:
    run = make_run(
        measurement("bare", workload, 1, cpu_us=100.0),
        measurement("broker", workload, 1, cpu_us=106.0),
    )
    c = check(run, f"cpu_per_message_{workload}")
    assert c.value == pytest.approx(1.06)
    assert c.met is False
    assert c.target == "<= 1.05x"


def test_a_target_whose_figures_were_not_measured_says_so() -> None:
    run = make_run(measurement("bare", "unary_100B", CONCURRENCY), targets=("bare", "broker"))
    c = check(run, "cpu_per_call_unary_100B")
    assert (c.value, c.met, c.stretch_met, c.verdict) == (None, None, None, "NOT MEASURED")
    assert "no cpu_us_per_call for broker on unary_100B at concurrency 32" in c.shown
    both = check(run, "cpu_per_call_unary_64KiB")
    assert "for broker and bare on unary_64KiB" in both.shown


def test_bare_without_cpu_figures_leaves_the_ratio_unmeasured() -> None:
    run = make_run(
        measurement("bare", "unary_100B", CONCURRENCY, cpu_us=None),
        measurement("broker", "unary_100B", CONCURRENCY, cpu_us=120.0),
    )
    assert check(run, "cpu_per_call_unary_100B").verdict == "NOT MEASURED"


def test_failed_calls_void_a_check_that_would_otherwise_be_met() -> None:
    run = make_run(
        measurement("bare", "unary_100B", CONCURRENCY, cpu_us=100.0),
        measurement("broker", "unary_100B", CONCURRENCY, cpu_us=101.0, errors=7),
    )
    c = check(run, "cpu_per_call_unary_100B")
    assert (c.met, c.stretch_met, c.failed) == (False, False, 7)
    assert "7 failed calls void the measurement" in c.verdict


def test_added_latency_is_information_not_a_target() -> None:
    c = check(full_run(), "added_p50_c1_unary_100B")
    assert c.value == pytest.approx(0.7)
    assert (c.limit, c.target, c.met) == (None, None, None)
    assert c.line().endswith("(information, not a target)")


def test_headline_ratio_stays_where_it_was() -> None:
    document = full_run(broker_cpu=130.0).as_json()
    assert document["summary"]["unary_100B"]["broker"]["proxy_cpu_vs_bare"] == pytest.approx(1.3)


def test_checks_are_written_to_json_with_their_figures() -> None:
    document = json.loads(json.dumps(full_run(broker_cpu=120.0).as_json()))
    first = document["checks"][0]
    assert first["key"] == "cpu_per_call_unary_100B"
    assert first["figures"] == {"broker_cpu_us_per_call": 120.0, "bare_cpu_us_per_call": 100.0}
    assert (first["met"], first["stretch_met"], first["limit"], first["stretch"]) == (
        True,
        False,
        1.3,
        1.15,
    )
    assert [c["key"] for c in document["checks"]] == CHECK_KEYS


@pytest.mark.parametrize("markdown", [False, True])
def test_text_shows_every_check_with_its_verdict(markdown: bool) -> None:
    text = full_run(broker_cpu=120.0).text(markdown=markdown)
    assert "Against the request path's targets" in text
    assert (
        "CPU per unary call, 100 B at concurrency 32, broker / bare: 1.20x "
        "(broker 120 µs, bare 100 µs); target <= 1.3x (stretch <= 1.15x): MET; stretch not met"
    ) in text
    assert "CPU per message, bidi ping-pong (one stream), broker / bare" in text
    assert "CPU µs/msg" in text  # the server streaming table's per-message column


# --- the command line ---------------------------------------------------------------------


def test_no_choice_is_a_full_run_written_to_the_committed_results() -> None:
    args = bench_run.arguments(["--seconds", "1"])
    assert not bench_run.partial(args)
    assert args.out == bench_run.RESULTS
    assert [w.key for w in bench_run.workloads(args)] == [w.key for w in WORKLOADS]
    assert bench_run.chosen(args.targets, bench_run.TARGETS, "targets") == list(bench_run.TARGETS)


def test_a_partial_run_is_not_written_over_the_committed_results() -> None:
    args = bench_run.arguments(["--seconds", "1", "--targets", "broker,bare"])
    try:
        assert bench_run.partial(args)
        assert args.out.is_dir()
        assert bench_run.RESULTS.resolve() not in [args.out.resolve(), *args.out.resolve().parents]
    finally:
        args.out.rmdir()


def test_a_partial_run_writes_where_it_is_told(tmp_path: Path) -> None:
    args = bench_run.arguments(
        ["--seconds", "1", "--workloads", "unary_100B", "--out", str(tmp_path)]
    )
    assert args.out == tmp_path
    assert [w.key for w in bench_run.workloads(args)] == ["unary_100B"]


def test_chosen_names_keep_the_table_order() -> None:
    assert bench_run.chosen(" broker, bare ,direct", bench_run.TARGETS, "targets") == [
        "direct",
        "bare",
        "broker",
    ]


def test_the_command_shown_repeats_a_partial_run() -> None:
    args = bench_run.arguments(
        ["--seconds", "2", "--targets", "broker,bare", "--workloads", "unary_100B", "--out", "/x"]
    )
    assert bench_run.command(args).endswith(
        "bench/run.py --targets bare,broker --workloads unary_100B"
    )
    assert bench_run.command(args).startswith("BENCH_SECONDS=2 ")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--targets", "bare,brokr"], "--targets 'bare,brokr': unknown brokr; choose from direct,"),
        (
            ["--workloads", "unary_1B"],
            "--workloads 'unary_1B': unknown unary_1B; choose from unary_100B,",
        ),
        (["--targets", " , "], "--targets ' , ': names none; choose from"),
        (["--seconds", "0"], "--seconds 0 must be more than 0"),
        (["--concurrency", "-1"], "--concurrency -1 must be more than 0"),
        (["--generators", "0"], "--generators 0 must be more than 0"),
    ],
)
def test_a_misspelt_choice_is_refused_before_anything_starts(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as refused:
        bench_run.arguments(["--seconds", "1", *argv])
    assert str(refused.value).startswith(says)


def test_the_json_path_is_compared_with_grpc_through_the_same_broker_and_with_bare() -> None:
    run = make_run(
        *(
            measurement(target, "unary_json", CONCURRENCY, cpu_us=cpu)
            for target, cpu in (
                ("bare", 100.0), ("broker", 120.0), ("broker-connect", 300.0),
                ("broker-rest", 280.0),
            )
        )
    )  # fmt: skip
    connect_vs_grpc = check(run, "cpu_per_call_broker-connect_vs_broker")
    assert connect_vs_grpc.value == pytest.approx(2.5)
    assert connect_vs_grpc.figures == {
        "broker-connect_cpu_us_per_call": 300.0,
        "broker_cpu_us_per_call": 120.0,
    }
    assert check(run, "cpu_per_call_broker-rest_vs_bare").value == pytest.approx(2.8)
    assert check(full_run(), "cpu_per_call_broker-rest_vs_bare").value is None  # not measured
