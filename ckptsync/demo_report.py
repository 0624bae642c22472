"""The demo's verdict (:mod:`ckptsync.demo`): what each trainer process logged
(:class:`RunRecord`), the comparison of the resumed run with the uninterrupted reference, bit
for bit (:func:`compare`), the loss plot and the report's text, whose last line is
``exact resume: yes`` or ``exact resume: no``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EXACT_NO", "EXACT_YES", "RunRecord", "compare", "format_report", "mib", "plot"]

EXACT_YES = "exact resume: yes"
EXACT_NO = "exact resume: no"


def mib(n: int) -> str:
    """``n`` bytes in MiB, for the narration and the report."""
    return f"{n / 2**20:.1f} MiB"


@dataclass
class RunRecord:
    """One trainer process's outcome, as the demo observed it."""

    losses: dict[int, float]
    step_times: dict[int, float]  # step -> monotonic time the demo saw it logged
    started: float
    ended: float
    killed: bool
    output: str


def compare(ref: RunRecord, run1: RunRecord, run2: RunRecord, ref_weights: Path, weights: Path,
            *, steps: int, save_every: int, killed_at: int,
            resumed_from: int) -> dict[str, Any]:
    """The verdict: every loss after the resume and every final weight against the reference's,
    bit for bit (``exact``), and the time the kill cost."""
    import torch

    before = [s for s in sorted(run1.losses) if run1.losses[s] != ref.losses.get(s)]
    expected_after = list(range(resumed_from + 1, steps + 1))
    after = [s for s in expected_after if run2.losses.get(s) != ref.losses.get(s)]
    a = torch.load(ref_weights, map_location="cpu", weights_only=True)
    b = torch.load(weights, map_location="cpu", weights_only=True)
    differ = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    differ += [k for k in b if k not in a]
    t_kill = run1.step_times.get(killed_at, run1.ended)
    t_ckpt = run1.step_times.get(resumed_from, run1.started)
    exact = (not before and not after and sorted(run2.losses) == expected_after
             and not differ and sorted(ref.losses) == list(range(1, steps + 1)))
    return {
        "exact": exact,
        "steps": steps,
        "save_every": save_every,
        "killed_at": killed_at,
        "resumed_from": resumed_from,
        "steps_redone": killed_at - resumed_from,
        "seconds_redone": round(max(t_kill - t_ckpt, 0.0), 2),
        "losses_compared": len(expected_after),
        "losses_differing_after_resume": after,
        "losses_differing_before_kill": before,
        "resumed_steps": sorted(run2.losses),
        "weights_compared": len(a),
        "weights_differing": differ,
    }


def plot(report: dict[str, Any], ref: RunRecord, run1: RunRecord, run2: RunRecord,
         path: Path) -> str | None:
    """Write the loss curves of the three runs to ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    r = sorted(ref.losses)
    ax.plot(r, [ref.losses[s] for s in r], color="0.6", lw=4, label="reference (uninterrupted)")
    k = sorted(run1.losses)
    ax.plot(k, [run1.losses[s] for s in k], color="tab:blue", lw=1.5, label="run, until SIGKILL")
    s2 = sorted(run2.losses)
    ax.plot(s2, [run2.losses[s] for s in s2], color="tab:orange", lw=1.5, ls="--",
            label="resumed on a fresh VM")
    ax.axvline(report["killed_at"], color="tab:red", lw=1, ls=":",
               label=f"killed at step {report['killed_at']}")
    ax.axvline(report["resumed_from"], color="tab:green", lw=1, ls=":",
               label=f"resumed from step {report['resumed_from']}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    verdict = "yes" if report["exact"] else "no"
    ax.set_title(f"ckptsync demo: exact resume: {verdict}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report (the last line is ``exact resume: yes`` or ``... no``)."""
    after = r["losses_differing_after_resume"]
    lines = [
        "",
        "ckptsync demo report",
        f"  remote               {r['remote']}",
        f"  killed               SIGKILL at step {r['killed_at']} of {r['steps']} "
        "(trainer and daemon; local checkpoints deleted)",
        f"  at the kill          newest local checkpoint: step {r['newest_local_step_at_kill']}; "
        f"remote: {r['remote_committed_at_kill']} committed"
        + (f", {r['remote_uncommitted_at_kill']} unfinished upload(s) ignored"
           if r["remote_uncommitted_at_kill"] else ""),
        f"  resumed from         {r['resumed_from_name']} (step {r['resumed_from']}), "
        f"{r['resumed_from_files']} files, {mib(r['resumed_from_bytes'])}, digests verified",
        f"  time lost            {r['steps_redone']} steps redone ({r['seconds_redone']} s of "
        f"training), plus {r['recovery_seconds']} s to pull and restart",
        "  losses after resume  "
        + (f"{r['losses_compared']}/{r['losses_compared']} identical to the uninterrupted run, "
           "bit for bit" if not after and r["resumed_steps"]
           else f"{len(after)} of {r['losses_compared']} differ (first at step "
                f"{after[0] if after else '?'})"),
        "  final weights        "
        + (f"{r['weights_compared']}/{r['weights_compared']} tensors identical, bit for bit"
           if not r["weights_differing"]
           else f"{len(r['weights_differing'])} tensors differ: "
                f"{', '.join(r['weights_differing'][:3])}"),
    ]
    if r["losses_differing_before_kill"]:
        lines.append(f"  before the kill      {len(r['losses_differing_before_kill'])} losses "
                     "differ from the reference (the trainer is not deterministic)")
    lines.append(f"  loss plot            {r['plot'] or '(not written: no matplotlib)'}")
    lines.append(f"  report               {Path(r['out_dir']) / 'report.txt'}")
    lines.append(EXACT_YES if r["exact"] else EXACT_NO)
    return "\n".join(lines)
