"""The fork server: what a script does dies with its child, a dead zygote costs no symbol, children are one shard's.

State poisoning is tested twice: through the real language layer (every attempt refused, the next shard reads the
real values), and with the language layer taken away (tests/sandbox_escape.py: unrestricted Python in a confined
child, so each change really happens) to show that even then the change never reaches the zygote, so the next
shard, job and user, all forked from it, see nothing of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psutil
import pytest

from shared.infra.config import SandboxLimits
from shared.sandbox.forkserver import ForkServer
from shared.sandbox.runner import SandboxUsage, run_script
from tests.helpers import sandbox_processes, wait_until
from tests.sandbox_escape import BOOT
from tests.unit.test_sandbox_runner import bars

LIMITS = SandboxLimits(symbol_timeout_s=5.0, memory_mb=512)


@pytest.fixture
def zygote() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def escaped() -> Iterator[ForkServer]:
    server = ForkServer(boot=BOOT)
    yield server
    server.close()


# Each poisons one piece of state the zygote imported; the check is true only while that state is pristine.
POISONS = {
    "math.pi": ("import math\nmath.pi = 3.0", "import math\nok = math.pi == 3.141592653589793"),
    "a ta function": (
        "from shared.domain.sandbox import ta\nta.sma = lambda values, period: (0.0,)",
        "from shared.domain.sandbox import ta\nok = ta.sma((1.0, 2.0), 1)[1] == 2.0",
    ),
    "an attribute of a ta function": (
        "from shared.domain.sandbox import ta\nta.ema.poison = 1\nta.rsi.__defaults__ = (2,)",
        "from shared.domain.sandbox import ta\nok = not hasattr(ta.ema, 'poison') and ta.rsi.__defaults__ == (14,)",
    ),
    "the ta facade": (
        "from shared.domain.sandbox import policy\n"
        "object.__getattribute__(policy.ALLOWED_MODULES['ta'], '_members')['sma'] = len",
        "from shared.domain.sandbox import policy, ta\n"
        "ok = object.__getattribute__(policy.ALLOWED_MODULES['ta'], '_members')['sma'] is ta.sma",
    ),
    "statistics internals": (
        "import statistics\nstatistics._sum = None\nstatistics.mean = max",
        "import statistics\nok = statistics.mean([1.0, 2.0, 6.0]) == 3.0 and statistics._sum is not None",
    ),
    "a builtin behind every facade": (
        "import builtins\nbuiltins.len = lambda x: 0\nbuiltins.sum = None",
        "import builtins\nok = builtins.len([1, 2]) == 2 and builtins.sum([1, 2]) == 3",
    ),
    "the policy's own tables": (
        "from shared.domain.sandbox import policy\nimport os\n"
        "policy.ALLOWED_MODULES['os'] = os\npolicy.DENIED_ATTRIBUTES = frozenset()",
        "from shared.domain.sandbox import policy\n"
        "ok = 'os' not in policy.ALLOWED_MODULES and 'format' in policy.DENIED_ATTRIBUTES",
    ),
    "a cached object the zygote imported": (
        "import re, numpy\nre._cache.clear()\nre._cache[(str, 'x', 0)] = 'poison'\nnumpy.pi = 4.0",
        "import re, numpy\nok = (str, 'x', 0) not in re._cache and numpy.pi != 4.0",
    ),
}


@pytest.mark.parametrize("name", sorted(POISONS))
def test_state_a_script_changes_dies_with_its_child(escaped: ForkServer, name: str) -> None:
    poison, check = POISONS[name]
    before = run_script(f"{check}\nresult = 1.0 if ok else 0.0", {}, [bars("A", 5)], LIMITS, server=escaped)[0]
    assert before.value == 1.0, before  # pristine to begin with
    # the poison really takes, in its child: the check fails right after it, within the same shard
    poisoned = run_script(f"{poison}\n{check}\nresult = 1.0 if ok else 0.0", {}, [bars("A", 5)], LIMITS,
                          server=escaped)[0]  # fmt: skip
    assert poisoned.value in (0.0, None), poisoned
    # the next shard (the next job, the next user: all forked from the same zygote) sees none of it
    after = run_script(f"{check}\nresult = 1.0 if ok else 0.0", {}, [bars("B", 5)], LIMITS, server=escaped)
    assert after[0].value == 1.0, after


RESTRICTED_ATTEMPTS = [
    "math.pi = 3",
    "import ta\nta.sma = len",
    "import ta\nta.sma.poison = 1",
    "import statistics\nstatistics.mean = max",
    "import ta\nta.len = len",
    "close[0] = 0.0",
    "import ta\nx = ta.sma(close, 2)\nx[0] = 1.0",
]


def test_what_a_script_tries_through_the_policy_reaches_no_other_shard(zygote: ForkServer) -> None:
    check = ("import ta\nimport statistics\n"
             "ok = math.pi == 3.141592653589793 and ta.sma((1.0, 3.0), 2)[1] == 2.0 and len(close) == 5\n"
             "ok = ok and statistics.mean([1.0, 5.0]) == 3.0 and close[0] == 100.0\n"
             "result = 1.0 if ok else 0.0")  # fmt: skip
    for attempt in RESTRICTED_ATTEMPTS:
        tried = run_script(f"try:\n    {attempt.replace(chr(10), chr(10) + '    ')}\nexcept Exception:\n    pass\n"
                           f"{check}", {}, [bars("A", 5)], LIMITS, server=zygote)  # fmt: skip
        assert tried[0].value == 1.0, (attempt, tried)  # refused: not even its own shard sees a change
        assert run_script(check, {}, [bars("B", 5)], LIMITS, server=zygote)[0].value == 1.0


def test_a_child_serves_one_shard_and_dies(zygote: ForkServer) -> None:
    usage = SandboxUsage()
    run_script("result = 1", {}, [bars("A", 5), bars("B", 5)], LIMITS, server=zygote, usage=usage)
    run_script("result = 1", {}, [bars("C", 5)], LIMITS, server=zygote, usage=usage)
    usage.settle()
    assert usage.children == 2  # one child a shard, each collected by the zygote
    assert usage.cpu_s > 0 and usage.max_rss_kb > 0
    assert sandbox_processes(psutil.Process().pid)[1] == []  # none left over


def test_a_zygote_killed_mid_shard_costs_no_symbol(zygote: ForkServer) -> None:
    zygote.ready()
    first = zygote.pid
    assert first is not None
    script = "s = 0\nfor i in range(3000000):\n    s += i\nresult = close[-1]"
    killer = threading.Thread(target=lambda: (
        wait_until(lambda: sandbox_processes(first)[1], 30, "a sandbox child at work"),
        psutil.Process(first).kill(),
    ))  # fmt: skip
    killer.start()
    outcomes = run_script(script, {}, [bars(s, 5) for s in "ABC"], LIMITS, server=zygote)
    killer.join()
    assert [(o.symbol, o.value, o.error) for o in outcomes] == [(s, 104.0, None) for s in "ABC"]
    assert zygote.restarts >= 1 and zygote.pid != first


def test_a_worn_out_zygote_is_replaced() -> None:
    worn = ForkServer(max_forks=2)
    try:
        pids = set()
        for _ in range(5):
            run_script("result = 1", {}, [bars("A", 5)], LIMITS, server=worn)
            pids.add(worn.pid)
        assert len(pids) == 3  # 2 + 2 + 1 forks: a new address layout every two shards
    finally:
        worn.close()
