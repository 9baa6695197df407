import re

import pytest

from utils import NAMES, UserError, resolve_name


def test_every_name_maps_to_versioned_minari_ids():
    assert len(NAMES) == 4 * 7 + 6 + 12  # 4 envs x (simple, medium, expert, medium-expert, random, 2 sac levels)
    for name, resolved in NAMES.items():
        assert resolved.name == name
        assert all(re.search(r"-v\d+$", minari_id) for minari_id in resolved.minari_ids)


@pytest.mark.parametrize(
    "name, ids",
    [
        ("hopper-medium", ("mujoco/hopper/medium-v0",)),
        ("hopper-medium-v2", ("mujoco/hopper/medium-v0",)),
        ("halfcheetah-simple", ("mujoco/halfcheetah/simple-v0",)),
        ("ant-expert-v2", ("mujoco/ant/expert-v0",)),
        ("walker2d-medium-expert", ("mujoco/walker2d/medium-v0", "mujoco/walker2d/expert-v0")),
        ("walker2d-medium-expert-v2", ("mujoco/walker2d/medium-v0", "mujoco/walker2d/expert-v0")),
        ("antmaze-umaze", ("D4RL/antmaze/umaze-v1",)),
        ("antmaze-large-diverse-v2", ("D4RL/antmaze/large-diverse-v1",)),
        ("pen-cloned", ("D4RL/pen/cloned-v2",)),
        ("relocate-expert-v1", ("D4RL/relocate/expert-v2",)),
        ("mujoco/hopper/medium-v0", ("mujoco/hopper/medium-v0",)),
        ("D4RL/door/human-v2", ("D4RL/door/human-v2",)),
    ],
)
def test_resolution(name, ids):
    assert resolve_name(name).minari_ids == ids


def test_random_is_generated_under_our_own_namespace():
    resolved = resolve_name("hopper-random-v2")
    assert resolved.minari_ids == ("o2o-local/hopper/random-v0",)
    assert resolved.generate_env_id == "Hopper-v5"
    ours = ("-random", "-sac-medium", "-sac-medium-replay")
    assert all(NAMES[name].generate_env_id is None for name in NAMES if not name.endswith(ours))
    replay = resolve_name("walker2d-sac-medium-replay")
    assert (
        replay.minari_ids == ("o2o-local/walker2d/sac-medium-replay-v0",) and replay.behavior_level == "medium-replay"
    )
    assert all(
        minari_id.startswith("o2o-local/")
        for name in NAMES
        if name.endswith(ours)
        for minari_id in NAMES[name].minari_ids
    )


def test_unknown_name_lists_the_known_names():
    with pytest.raises(UserError) as caught:
        resolve_name("hopper-mediun")
    message = str(caught.value)
    assert "unknown dataset name 'hopper-mediun'" in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize("name", ["hopper-medium-replay", "walker2d-medium-replay-v2", "halfcheetah-full-replay"])
def test_replay_levels_are_refused_with_a_reason(name):
    with pytest.raises(UserError, match="Minari has no"):
        resolve_name(name)


@pytest.mark.parametrize("name", ["kitchen-complete", "kitchen-mixed-v0"])
def test_kitchen_is_refused_with_a_reason(name):
    with pytest.raises(UserError, match="does not run on mujoco 4"):
        resolve_name(name)


def test_versionless_minari_id_is_refused():
    with pytest.raises(UserError, match="no version suffix"):
        resolve_name("mujoco/hopper/medium")
