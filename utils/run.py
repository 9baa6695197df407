"""What every script's main() does around its algorithm: seeds and determinism, the device, --resume and
--pretrained, the run folder with its args.json and TensorBoard writer, the environments, checkpoints and the
end of a run. Nothing here knows an algorithm: a script passes its name, its agent (anything with
`state_dict()`) and its Args, which extend RunArgs.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    atomic_save,
    keep_run_settings,
    load_for_resume,
    resume_state,
    rewind_events,
    set_env_state,
    set_rng_state,
)
from utils.data import OfflineData, check_pretrained_dataset
from utils.envs import make_env
from utils.errors import UserError
from utils.fast import check_fast_flags
from utils.metrics import Metrics, UpdateClock


@dataclass
class RunArgs:
    """The flags of every script that say where and how a run goes; each script's Args adds its algorithm's."""

    exp_name: str = "run"
    """name of the experiment, part of the run name"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """deterministic torch kernels where torch has them (use_deterministic_algorithms, warn-only) and cuDNN"""
    tf32: bool = False
    """TF32 matmuls on CUDA (torch.set_float32_matmul_precision("high")): faster, about 3 fewer decimal digits"""
    cuda: bool = True
    """use the GPU when there is one (falls back to the CPU with a notice)"""
    run_dir: str = "runs"
    """folder that receives runs/<run name>/ (TensorBoard events, args.json, checkpoints)"""
    save_model: bool = True
    """write offline.pt after pretraining and final.pt at the end"""
    progress: bool = True
    """tqdm bars (off automatically when stdout is not a terminal)"""
    compile: bool = False
    """torch.compile the update steps and the acting policy (minutes of compilation first)"""
    cudagraphs: bool = False
    """capture each update step in a CUDA graph and replay it (CUDA only)"""
    env_id: str = "hopper-medium"
    """dataset: D4RL-style name (hopper-medium) or Minari id; see README's name table"""
    pretrained: str | None = None
    """an offline.pt of this script to start from; skips the offline phase"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    log_freq: int = 1_000
    """write training metrics every this many updates"""
    checkpoint_freq: int | None = None
    """write checkpoint.pt (all state, for --resume) every this many updates offline / env steps online;
    None = at every evaluation"""
    resume: str | None = None
    """continue the run in this folder from its checkpoint.pt; every other flag comes from its args.json"""


def check_bounds(args, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = ()) -> None:
    """One line for the first count out of range: `positive` ones and the shared eval_episodes, log_freq and
    checkpoint_freq (unless None) must be >= 1, `nonnegative` ones (budgets) >= 0."""
    shared = ("eval_episodes", "log_freq") + (("checkpoint_freq",) if args.checkpoint_freq is not None else ())
    for names, low in (((*shared, *positive), 1), (nonnegative, 0)):
        for name in names:
            if getattr(args, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def apply_preset(args, presets: dict[str, dict]) -> None:
    """Set the values of `presets[args.preset]`; a flag given with another value than both its default and the
    preset's is refused with one line (a run never silently means something else than its command line)."""
    for name, value in presets[args.preset].items():
        given, default = getattr(args, name), type(args).__dataclass_fields__[name].default
        if given not in (default, value):
            flag = f"--{name.replace('_', '-')}"
            raise UserError(f"--preset {args.preset} sets {flag} {value}; drop {flag} {given} or the preset")
        setattr(args, name, value)


def save_checkpoint(path: Path, algorithm: str, agent, args, data: OfflineData, phase: str, step: int, **state):
    """One self-contained dict, written atomically: the agent's state_dict, what its data and env are, and `state`
    (what --resume needs, in checkpoint.pt)."""
    checkpoint = {
        "algorithm": algorithm,
        "args": asdict(args),
        **agent.state_dict(),
        "obs_dim": data.observations.shape[1],
        "act_dim": data.actions.shape[1],
        "phase": phase,
        "step": step,
        "dataset": data.name,
        "env_spec": data.env_spec,
        "eval_env_spec": data.eval_env_spec,
        **state,
    }
    atomic_save(checkpoint, path)


class Run:
    """One run of a script, from its flags to final.pt.

    Construction seeds python, numpy and torch, sets determinism, picks the device and, with --resume, loads the
    checkpoint (its flags replace `args`'). `pretrained()` loads --pretrained's offline.pt, `open(data)` makes or
    rewinds the run folder and opens the writer and the envs, `save` writes checkpoint.pt, `finish` final.pt.
    """

    def __init__(self, args: RunArgs, algorithm: str, title: str):  # title: "an SO2", for the messages
        self.args, self.algorithm, self.title = args, algorithm, title
        if args.resume is not None:  # the run's determinism, device, fast path and checkpoint cadence
            keep_run_settings(args.resume, args)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        if args.torch_deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(args.torch_deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        self.device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
        if args.cuda and self.device.type == "cpu":
            print("CUDA is not available: running on the CPU", file=sys.stderr)
        check_fast_flags(args.cudagraphs, self.device)
        args.progress = args.progress and sys.stdout.isatty()
        self.resume, self.path = None, None
        if args.resume is not None:
            self.resume, self.path = load_for_resume(args.resume, algorithm, args, self.device)
        # after --resume, which may bring the run's own --tf32
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")

    def pretrained(self, needs_statistics: bool = False) -> dict | None:
        """--pretrained's checkpoint (an offline.pt of this script), or None, also when resuming."""
        args = self.args
        if args.pretrained is None or self.resume is not None:
            return None
        try:
            checkpoint = torch.load(args.pretrained, map_location=self.device, weights_only=False)
            if checkpoint.get("algorithm") != self.algorithm or checkpoint.get("phase") != "offline":
                raise ValueError(f"not {self.title} offline.pt")
            if needs_statistics and "obs_mean" not in checkpoint:
                raise ValueError("written by an earlier version without state statistics; pretrain again")
        except Exception as err:
            raise UserError(f"--pretrained {args.pretrained} cannot be used ({type(err).__name__}: {err})") from err
        return checkpoint

    def adopt(self, flags: dict) -> None:
        """Take the offline run's architecture flags, with a one-line notice where the command line said otherwise
        (None: not given)."""
        given = {name: getattr(self.args, name) for name in flags}
        if any(value is not None and value != flags[name] for name, value in given.items()):
            changed = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in flags.items())
            print(f"--pretrained: using the checkpoint's {changed}", file=sys.stderr)
        for name, value in flags.items():
            setattr(self.args, name, value)

    def open(self, data: OfflineData, pretrained: dict | None):
        """Check that the loaded checkpoints belong to `data`, make the run folder (or cut a resumed run's events
        back to its checkpoint), and open the writer, the training env and the evaluation envs."""
        args = self.args
        if pretrained is not None:
            check_pretrained_dataset(pretrained, data, args.pretrained)
        if self.resume is not None:
            check_pretrained_dataset(self.resume, data, args.resume)
            rewind_events(self.path, self.resume["events"])  # the steps logged after the checkpoint are logged again
        else:
            run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.path = Path(args.run_dir) / run_name
            self.path.mkdir(parents=True, exist_ok=True)
            record = asdict(args)
            if pretrained is not None:  # what the loaded networks were trained with, which --pretrained skipped
                trained = pretrained["args"]
                record["pretrained_with"] = {"offline_steps": pretrained["step"], "exp_name": trained["exp_name"],
                                             "seed": trained["seed"], "run_dir": trained["run_dir"]}  # fmt: skip
            (self.path / "args.json").write_text(json.dumps(record, indent=2))
        self.data, self.writer = data, SummaryWriter(str(self.path))
        # Online training runs in the evaluation env spec too (AntMaze: the fixed goal it is scored on; the data
        # env draws a new, unobserved goal per episode), as a separate instance with its own seed. The evaluation
        # episodes run in lockstep in eval_episodes envs, one batched policy call per step.
        self.env = make_env(data.eval_env_spec, args.seed)
        self.eval_env = [make_env(data.eval_env_spec, args.seed + 100 + i) for i in range(args.eval_episodes)]
        return self.writer, self.env, self.eval_env

    def restore_rng(self) -> None:
        set_rng_state(self.resume["rng"])

    def write(self, name: str, agent, phase: str, step: int, **state) -> None:
        save_checkpoint(self.path / name, self.algorithm, agent, self.args, self.data, phase, step, **state)

    def saver(self, agent, extra=dict):
        """`save(phase, step, metrics, **loop state)` for the phases: checkpoint.pt with the agent, the loop state,
        the metrics not yet written, the RNG streams, the env, the event file sizes, and `extra()`."""

        def save(phase: str, step: int, metrics, **state) -> None:
            state |= resume_state(self.writer, self.path, self.env) | {"metrics": (metrics.sums, metrics.counts)}
            state["format"] = CHECKPOINT_FORMAT
            self.write(CHECKPOINT, agent, phase, step, **extra(), **state)

        return save

    def finish(self, agent, online_steps: int, **state) -> Path:
        """final.pt (with `state`), checkpoint.pt removed, the writer closed; returns the run folder."""
        if self.args.save_model:
            self.write("final.pt", agent, "online", online_steps, **state)
        (self.path / CHECKPOINT).unlink(missing_ok=True)  # the run is complete; final.pt is what remains
        self.writer.close()
        print(f"run written to {self.path}")
        return self.path


class Episodes:
    """The training env of an online phase: the running episode's observation and return, charts/episodic_return
    and a reset at each episode's end, and what a checkpoint keeps of it (`state()`); on --resume a MuJoCo episode
    continues exactly, another env's restarts from a fresh reset."""

    def __init__(self, env, writer, seed: int, resume: dict | None = None):
        self.env, self.writer = env, writer
        if resume is None:
            (self.obs, _), self.episode_return = env.reset(seed=seed), 0.0
        else:
            self.obs, self.episode_return = resume["obs"], resume["episode_return"]
            if not set_env_state(env, resume["env"]):
                (self.obs, _), self.episode_return = env.reset(), 0.0

    def step(self, action, step: int):
        """One env step from the current observation: (obs, reward, next_obs, terminated, ended). A truncated step
        is not terminated: stored as not done, it bootstraps."""
        obs, (next_obs, reward, terminated, truncated, _) = self.obs, self.env.step(action)
        self.obs, self.episode_return = next_obs, self.episode_return + float(reward)
        if terminated or truncated:
            self.writer.add_scalar("charts/episodic_return", self.episode_return, step)
            (self.obs, _), self.episode_return = self.env.reset(), 0.0
        return obs, reward, next_obs, terminated, terminated or truncated

    def state(self) -> dict:
        return {"obs": self.obs, "episode_return": self.episode_return}


def offline_loop(args, writer, update: Callable, evaluate: Callable, save=None, resume: dict | None = None) -> None:
    """The offline phase's bookkeeping around `update(step) -> metrics`, from step 1 or after `resume`'s step: the
    metrics' means and offline/UPS every log_freq updates, `evaluate(step) -> result` every offline_eval_freq and at
    the end, and `save("offline", step, metrics=...)` (checkpoint.pt; none when the phase is called directly) every
    checkpoint_freq updates, by default at each evaluation."""
    save = save or (lambda *_, **__: None)
    first, metrics = (resume["step"] + 1 if resume else 1), Metrics(writer)
    if resume:
        metrics.sums, metrics.counts = resume["metrics"]
    bar = tqdm(range(first, args.offline_steps + 1), desc="offline", disable=not args.progress)
    start = time.perf_counter()
    for step in bar:
        metrics.add(update(step))
        if step % args.log_freq == 0:
            metrics.flush(step)
            writer.add_scalar("offline/UPS", (step - first + 1) / (time.perf_counter() - start), step)
        if step % args.offline_eval_freq == 0 or step == args.offline_steps:
            bar.set_postfix(score=f"{evaluate(step)['normalized_score']:.1f}")
        if step % (args.checkpoint_freq or args.offline_eval_freq) == 0 or step == args.offline_steps:
            save("offline", step, metrics=metrics)


def online_loop(args, writer, env, device, act, store, train, evaluate, state, save=None, resume=None, on_log=None,
                after_step=None) -> None:  # fmt: skip
    """The online phase's bookkeeping, from step 1 or after `resume`'s step. An evaluation at step 0; then per env
    step: `act(step, obs) -> action`, the env step (Episodes: returns, resets, what a checkpoint keeps of the running
    episode), `store(step, obs, action, reward, next_obs, terminated, ended)` and `train(step, metrics) -> number of
    updates made` (timed by an UpdateClock); after every log_freq updates and at the last step, the metrics' means,
    charts/UPS (updates per second of update time), charts/SPS (env steps per wall second) and `on_log(step)`;
    `evaluate(step) -> result` every eval_freq steps, then `after_step(step)` (also after step 0's evaluation: a
    change of phase); and checkpoint.pt by `save` (none when the phase is called directly) every checkpoint_freq
    steps, by default at each evaluation, with `state()`, the script's part of the loop state (its buffers)."""
    save = save or (lambda *_, **__: None)
    metrics = Metrics(writer)
    if resume is None:
        evaluate(0)
        if after_step is not None:
            after_step(0)
        (updates, logged_at, update_time), first = (0, 0, 0.0), 1
    else:
        metrics.sums, metrics.counts = resume["metrics"]
        (updates, logged_at, update_time), first = resume["loop"], resume["step"] + 1
    episodes, start = Episodes(env, writer, args.seed, resume), time.perf_counter()
    clock = UpdateClock(device, update_time)  # update time: CUDA events on a GPU, no sync per step
    bar = tqdm(range(first, args.online_steps + 1), desc="online", disable=not args.progress)
    for step in bar:
        action = act(step, episodes.obs)
        obs, reward, next_obs, terminated, ended = episodes.step(action, step)
        store(step, obs, action, reward, next_obs, terminated, ended)
        with clock:
            made = train(step, metrics)
        if not made:
            clock.discard_last()
        updates += made
        if made and (updates - logged_at >= args.log_freq or step == args.online_steps):
            logged_at = updates
            metrics.flush(step)
            writer.add_scalar("charts/UPS", updates / clock.seconds(), step)
            writer.add_scalar("charts/SPS", (step - first + 1) / (time.perf_counter() - start), step)
            if on_log is not None:
                on_log(step)
        if step % args.eval_freq == 0:
            bar.set_postfix(score=f"{evaluate(step)['normalized_score']:.1f}")
        if after_step is not None:
            after_step(step)
        if step % (args.checkpoint_freq or args.eval_freq) == 0 and step < args.online_steps:
            loop = (updates, logged_at, clock.seconds())
            save("online", step, metrics=metrics, loop=loop, **episodes.state(), **state())


def cli(main: Callable, args_class: type) -> None:
    """A script's entry point: its flags by tyro, then main(args); bad input ends with one line and exit code 1."""
    try:
        main(tyro.cli(args_class))
    except UserError as err:
        sys.exit(f"error: {err}")


def update_loop(args, writer, name: str, steps: int, update: Callable, ups_tag: str | None = None) -> None:
    """A phase of `steps` updates without evaluations or checkpoints (a behaviour model, OPT's Online Pre-Training):
    `update(step) -> metrics` under a progress bar named `name`, the metrics' means every log_freq updates and at
    the end, with updates per second under `ups_tag` if given."""
    metrics, start = Metrics(writer), time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=name, disable=not args.progress):
        metrics.add(update(step))
        if step % args.log_freq == 0 or step == steps:
            metrics.flush(step)
            if ups_tag is not None:
                writer.add_scalar(ups_tag, step / (time.perf_counter() - start), step)
