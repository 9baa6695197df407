"""Q of Off2On (CQL) checkpoints on dataset states: dataset actions vs the actor's actions vs uniform ones.

    MINARI_DATASETS_PATH=... python benchmark/diagnostics/q_probe.py runs/.../final.pt ...

States: every 40th episode of o2o-local/hopper/sac-medium-v0. Prints the mean twin-minimum Q (averaged over
agents) for each action source, and how far the actor's deterministic action is from the dataset's.
"""

import sys
from pathlib import Path

import minari
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))
from off2on import Actor, Critic

torch.manual_seed(0)
episodes = list(minari.load_dataset("o2o-local/hopper/sac-medium-v0").iterate_episodes(range(0, 2000, 40)))
obs = torch.tensor(np.concatenate([e.observations[:-1] for e in episodes]), dtype=torch.float32)
data_action = torch.tensor(np.concatenate([e.actions for e in episodes]), dtype=torch.float32)
print(f"{len(obs)} states; dataset |a| mean {data_action.abs().mean():.2f}")


def mean_q(critic: Critic, agents: int, action: torch.Tensor) -> float:
    pairs = (x.unsqueeze(0).expand(2 * agents, -1, -1) for x in (obs, action))
    return critic.twin_min(*pairs).mean().item()


for path in sys.argv[1:]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hidden, agents = checkpoint["args"]["hidden_dim"], checkpoint["num_agents"]
    actor = Actor(checkpoint["obs_dim"], checkpoint["act_dim"], agents, hidden)
    critic = Critic(checkpoint["obs_dim"], checkpoint["act_dim"], 2 * agents, hidden)
    actor.load_state_dict(checkpoint["actor"])
    critic.load_state_dict(checkpoint["critic"])
    with torch.no_grad():
        mean_action, _ = actor.ensemble(obs, deterministic=True)
        sources = {
            "data": data_action,
            "actor mean": mean_action,
            "actor sample": actor.ensemble(obs)[0],
            "uniform": torch.rand_like(data_action) * 2 - 1,
        }
        values = ", ".join(f"{name} {mean_q(critic, agents, a):.1f}" for name, a in sources.items())
        gap = (mean_action - data_action).pow(2).mean().item()
        print(f"{path}: Q {values}; actor-data MSE {gap:.3f}")
