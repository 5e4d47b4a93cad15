"""Hand-built ledgers with known answers (times in seconds from launch)."""

from __future__ import annotations

from datetime import datetime, timezone

from supervisor.ledger.events import Event

T0 = 1_700_000_000.0


def ev(t: float, kind: str, inc: str = "i0", writer: str = "node0", **fields) -> Event:
    at = T0 + t
    return Event(kind=kind, t=at, time=datetime.fromtimestamp(at, timezone.utc).isoformat(), writer=writer,
                 incarnation=inc, mono=t, seq=0, fields=fields)


def steps(inc: str, start_t: float, first: int, last: int, step_s: float = 1.0, ckpt_every: int = 0,
          save_s: float = 0.0, commit_s: float = 0.0) -> tuple[list[Event], float]:
    """Steps first..last, one per step_s, checkpoints after each multiple of ckpt_every. -> (events, end time)."""
    out, t = [], start_t
    for step in range(first, last + 1):
        t += step_s
        out.append(ev(t, "first_step" if step == first else "progress", inc, step=step, loss=1.0))
        if ckpt_every and step % ckpt_every == 0:
            t += save_s
            out.append(ev(t, "checkpoint_saved", inc, step=step, duration_s=save_s))
            t += commit_s
            out.append(ev(t, "checkpoint_committed", inc, step=step, duration_s=commit_s))
    return out, t


def chaos_run() -> tuple[list[Event], dict]:
    """launch; queue 10 s; start-up 5 s (node_start -> trainer_start; first step counted from 15);
    inc i0: steps 1..10 (1 s each), checkpoint every 4 (save 0.5 + commit 0.25; the commit in the
    background, as rank 0's committer runs it), killed 0.4 s into step 11
    with no notice; detection 2 s, provisioning 3 s, restart 4 s (resume 8; first step 9 completes at the end);
    inc i1: steps 9..14, notice at step 12, saves step 12 on notice (0.5 + 0.25), preempted, exit 75;
    detection 1 s, provisioning 2 s, restart 3 s; inc i2: steps 13..16, final checkpoint at 16, finished 0.2 s later."""
    e = [ev(0, "launch", "launcher", "launcher", backend="skypilot", num_nodes=2, accelerators={"H100": 8}, spot=True)]
    e += [ev(10, "node_start", "i0", "node0", node_rank=0, num_nodes=2), ev(10.5, "node_start", "i0", "node1", node_rank=1)]
    e += [ev(12, "trainer_start", "i0"), ev(13, "resume", "i0", step=None)]
    # first step completes at 15 (start-up 10 -> 15 includes the first step)
    s0, t = steps("i0", 14.0, 1, 10, ckpt_every=4, save_s=0.5, commit_s=0.25)
    e += s0
    kill = t + 0.4  # 10 steps + 2 checkpoints: t = 14 + 10 + 1.5 = 25.5
    e += [ev(kill, "preempted", "launcher", "launcher", with_notice=False), ev(kill, "chaos", "launcher", "launcher", action="kill node1")]
    e += [ev(kill + 2, "recovery_started", "launcher", "launcher", reason="node lost")]
    e += [ev(kill + 5, "node_start", "i1", "node0", node_rank=0), ev(kill + 5.1, "node_start", "i1", "node1", node_rank=1),
          ev(kill + 6, "resume", "i1", step=8)]
    s1, t = steps("i1", kill + 8, 9, 12, ckpt_every=0)
    e += s1
    notice_t = t - 0.5
    e += [ev(notice_t, "notice", "i1", source="chaos", deadline=T0 + t + 30)]
    t += 0.5
    e += [ev(t, "checkpoint_saved", "i1", step=12, duration_s=0.5)]
    t += 0.25
    e += [ev(t, "checkpoint_committed", "i1", step=12, duration_s=0.25)]
    t += 0.05
    e += [ev(t, "preempted", "i1", with_notice=True, saved_step=12), ev(t + 0.01, "exit", "i1", code=75, reason="preempted, saved")]
    loss2 = t
    e += [ev(t + 1, "recovery_started", "launcher", "launcher", reason="preempted")]
    e += [ev(t + 3, "node_start", "i2", node_rank=0), ev(t + 3.5, "resume", "i2", step=12)]
    s2, t = steps("i2", t + 5, 13, 16, ckpt_every=4, save_s=0.5, commit_s=0.25)
    e += s2
    e += [ev(t + 0.1, "exit", "i2", code=0), ev(t + 0.2, "job_finished", "launcher", "launcher", state="SUCCEEDED")]
    end = t + 0.2
    expect = {
        "wall_s": end,
        # queue 10 + start-up 5 + provisioning 3 + 2 + tear-down after the last checkpoint 0.2
        "queue_s": 10 + 5 + 3 + 2 + 0.2,
        # detection 2 + restart 4 (kill+5 -> first step at kill+9) + shutdown after the notice save 0.05
        # + detection 1 + restart 3
        "recovery_s": 2 + 4 + 0.05 + 1 + 3,
        # i0: steps 9, 10, 0.4 s of step 11, and step 8's commit (in the background, past the
        # step the next start resumed from) were recomputed
        "lost_s": 2 + 0.4 + 0.25,
        # saves block the loop; commits run beside it (rank 0's committer thread) and count
        # only when the loop had stopped and waited: i1's notice save, i2's final one
        "checkpoint_s": 2 * 0.5 + 0.75 + 0.75,
        # i0: steps 2..8 (7 s) and step 4's commit, i1: steps 10..12 (3 s), i2: steps 14..16 (3 s)
        "productive_s": 7 + 0.25 + 3 + 3,
        "loss2": loss2,
    }
    return e, expect
