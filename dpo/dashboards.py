"""Training curves in TensorBoard and W&B (`--report-to`), written from the rows of steps.parquet and evals.parquet.

The Parquet logs stay the source of truth; a dashboard gets the same rows under TRL's names, as transformers'
TensorBoard and W&B callbacks show a DPOTrainer run: `train/<name>` for each optimizer step, `eval/<name>` for
each eval pass, names from refcache_base.runlog_schema.TRL_METRICS, x = the row's `step` (the steps.parquet convention).
Only rank 0 writes (RunLog calls these on rank 0 only).

No step appears twice after a resume:
- TensorBoard (RUN/tensorboard/): a resumed run's writer starts with purge_step = the checkpoint's step, so
  TensorBoard drops what the interrupted run logged from that step on. A run that had no event files yet gets
  the rows it restored from the checkpoint first.
- W&B (RUN/wandb/, the run's id, `resume="allow"`): offline unless a login exists (WANDB_API_KEY or a netrc
  entry for the W&B host) or WANDB_MODE says otherwise; `wandb sync RUN/wandb/offline-run-*` uploads it later.
  W&B gets rows when the Parquet logs are flushed, and RUN/wandb/refcache-sent.json records the last step sent
  right after; a resumed run sends only the later steps (an offline W&B run cannot be rewound).
"""

import importlib.util
import json
import netrc
import os
import sys
from urllib.parse import urlparse

from refcache_base import UserError
from refcache_base.files import write_json
from refcache_base.runlog_schema import EVALS_SCHEMA, TRL_METRICS

REPORT_TO = ("tensorboard", "wandb")  # each is also the name of its package and of refcache's pip extra for it


def check_usable(names):
    """One-line UserError, before anything is written, when a dashboard cannot start: its package is missing
    (naming the pip extra), or W&B is told to go online (WANDB_MODE=online) without a login."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--report-to {name} needs the {name} package: pip install 'refcache[{name}]'")
    if "wandb" in names and os.environ.get("WANDB_MODE") == "online" and not logged_in():
        raise UserError("--report-to wandb: WANDB_MODE=online but there is no W&B login (WANDB_API_KEY or `wandb "
                        "login`); log in, or unset WANDB_MODE to log offline")


def tags(row: dict, prefix: str) -> dict:
    """{`prefix/TRL name`: value} for the TRL metrics a steps/evals row holds."""
    return {f"{prefix}/{name}": float(row[col]) for name, col, _ in TRL_METRICS if row.get(col) is not None}


def step_tags(row: dict) -> dict:
    return tags(row, "train")


def eval_tags(row: dict) -> dict:
    return tags({k: row[k] for k in EVALS_SCHEMA.names if k in row}, "eval")


def open_dashboards(names, out: str, run_id: str, config: dict, start_step: int, restored: list) -> list:
    """The dashboards named in `names`, started for a run in `out` at `start_step`; `restored` = [(step, tags)]
    the checkpoint brought back (all before start_step), for a dashboard that has not seen them."""
    boards = []
    try:
        for name in names:
            boards.append({"tensorboard": TensorBoard, "wandb": WandB}[name](out, run_id, config, start_step,
                                                                            restored))
    except BaseException:
        for board in boards:
            board.close()
        raise
    return boards


class TensorBoard:
    def __init__(self, out, run_id, config, start_step, restored):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(out, "tensorboard")
        seen = os.path.isdir(log_dir) and any(n.startswith("events.") for n in os.listdir(log_dir))
        self.writer = SummaryWriter(log_dir, purge_step=start_step if seen and start_step else None)
        if not seen:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
            for step, values in restored:
                self.log(step, values)

    def log(self, step: int, values: dict):
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out, run_id, config, start_step, restored):
        import wandb

        self.dir = os.path.join(out, "wandb")
        os.makedirs(self.dir, exist_ok=True)
        self.record = os.path.join(self.dir, "refcache-sent.json")
        self.sent = _read_sent(self.record)  # the last step W&B has been sent, -1 = none
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "refcache"), id=run_id,
                                  name=os.path.basename(os.path.normpath(out)), dir=out, mode=mode, resume="allow",
                                  config=config)
        except Exception as e:  # noqa: BLE001 - W&B's own errors (login, network), reported on one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--report-to wandb: W&B did not start in {mode} mode ({first}); set "
                            "WANDB_MODE=offline to log without a server") from None
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            print(f"W&B: no login found, logging offline to {self.dir} (upload: wandb sync "
                  f"{self.dir}/offline-run-*)", file=sys.stderr)
        self.pending = [(s, v) for s, v in restored if s > self.sent]

    def log(self, step: int, values: dict):
        if step > self.sent:
            self.pending.append((step, values))

    def flush(self):
        """Send what is pending (one W&B step per training step: train and eval tags of a step together)."""
        if not self.pending:
            return
        by_step = {}
        for step, values in self.pending:
            by_step.setdefault(step, {}).update(values)
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step)
        self.sent = max(by_step)
        self.pending.clear()
        write_json(self.record, {"last_step": self.sent})

    def close(self):
        self.flush()
        self.run.finish()


def _read_sent(path) -> int:
    try:
        with open(path) as f:
            return int(json.load(f)["last_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def logged_in() -> bool:
    """Whether W&B has credentials here: WANDB_API_KEY, or a netrc entry for its host (read, never shown)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
