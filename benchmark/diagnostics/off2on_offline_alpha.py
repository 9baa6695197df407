"""algorithms/off2on.py with the offline temperature kept at the hand-over instead of a fresh alpha = 1.

    python benchmark/diagnostics/off2on_offline_alpha.py --pretrained <offline.pt> <flags>

The online alpha starts at the mean of the offline.pt's per-agent temperatures (the card and the official code
start it at 1; our offline runs end near 0.5) and is tuned online as usual; nothing else changes. A diagnostic of
the drop after the hand-over, for --pretrained runs only.
"""

import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))  # off2on.py adds the repo root
import off2on

hand_over = off2on.Off2On.hand_over  # the original, before the patch below


def hand_over_keeping_alpha(self: off2on.Off2On) -> None:
    hand_over(self)
    offline_log_alpha = torch.load(self.args.pretrained, map_location="cpu", weights_only=False)["log_alpha"]
    self.log_alpha = offline_log_alpha.mean().to(self.device).requires_grad_(True)
    self.alpha_optimizer = off2on.adam([self.log_alpha], self.args.online_lr, self.args.cudagraphs)


if __name__ == "__main__":
    args = tyro.cli(off2on.Args)
    if args.pretrained is None:
        sys.exit("off2on_offline_alpha.py: pass --pretrained <offline.pt>; the offline temperature comes from it")
    off2on.Off2On.hand_over = hand_over_keeping_alpha
    off2on.main(args)
