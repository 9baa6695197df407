"""algorithms/off2on.py with the actor or the critics frozen online: which of the two SAC updates makes the drop?

    python benchmark/diagnostics/off2on_frozen.py --frozen {actor,critic} \
        --pretrained <offline.pt> <flags>

The frozen part's fresh online Adam gets learning rate 0, so its parameters keep the offline.pt's values (and
with frozen critics the target critics keep them too); everything else, the temperature and the density network
included, runs as in off2on.py. A diagnostic of the drop after the hand-over, for --pretrained runs only.
"""

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))  # off2on.py adds the repo root
import off2on

hand_over = off2on.Off2On.hand_over  # the original, before the patch below


def frozen_hand_over(part: str):
    def patched(self: off2on.Off2On) -> None:
        hand_over(self)
        optimizer = self.actor_optimizer if part == "actor" else self.critic_optimizer
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    return patched


if __name__ == "__main__":
    argv = sys.argv[1:]
    position = argv.index("--frozen") if "--frozen" in argv else len(argv)
    part = argv[position + 1] if position + 1 < len(argv) else None
    if part not in ("actor", "critic"):
        sys.exit("off2on_frozen.py: pass --frozen actor or --frozen critic")
    args = tyro.cli(off2on.Args, args=argv[:position] + argv[position + 2 :])
    if args.pretrained is None or args.cudagraphs or args.compile:
        sys.exit("off2on_frozen.py: pass --pretrained <offline.pt>, eager only (no --compile, --cudagraphs)")
    off2on.Off2On.hand_over = frozen_hand_over(part)
    off2on.main(args)
