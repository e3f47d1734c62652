"""The composite base of the BTM ensemble and the routed model (bts.baselines.composite), and the member manifest
they share with the stitched model (bts.core.members): relocatable folders, exports checked before writing,
members refused when changed, one config base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import random_ids, save_members, tiny_model

from bts import BTSError, BTSForCausalLM
from bts.baselines.btm import BTMConfig, BTMEnsemble
from bts.baselines.composite import MemberSetConfig
from bts.baselines.routing import RoutedConfig, RoutedModel

COMPOSITES = [BTMEnsemble, RoutedModel]


def _members_inside(tmp_path):
    """Members saved inside the folder the composite is saved to: the manifest must refer to them relatively."""
    return save_members(tmp_path / "folder" / "members", "llama", 2)


@pytest.mark.parametrize("cls", COMPOSITES)
def test_a_folder_holding_its_members_moves_as_a_whole(tmp_path, cls):
    hub, experts = _members_inside(tmp_path)
    model = cls.from_members([hub, *experts], names=["seed", "a", "b"])
    model.save_pretrained(tmp_path / "folder")
    manifest = json.loads((tmp_path / "folder" / "config.json").read_text())["members"]
    assert [m["path"] for m in manifest] == ["members/hub", "members/e0", "members/e1"]
    shutil.move(tmp_path / "folder", tmp_path / "moved")
    loaded = cls.from_pretrained(tmp_path / "moved")
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # Loaded members are recorded where they are, so a save elsewhere still finds them.
    assert all(m["path"].startswith(str((tmp_path / "moved").resolve())) for m in loaded.config.members)
    loaded.save_pretrained(tmp_path / "elsewhere")
    cls.from_pretrained(tmp_path / "elsewhere")


@pytest.mark.parametrize("cls", COMPOSITES)
def test_export_of_a_changed_member_writes_nothing(tmp_path, cls):
    hub, experts = save_members(tmp_path, "llama", 1)
    model = cls.from_members([hub, *experts])
    tiny_model(seed=7).save_pretrained(experts[0])  # retrained in place after the composite was built
    with pytest.raises(BTSError, match="has changed since it was loaded"):
        model.save_pretrained(tmp_path / "export", export_members=True)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("cls", COMPOSITES)
def test_in_memory_members_are_written_into_the_folder(tmp_path, cls):
    model = cls.from_members([tiny_model(seed=0), tiny_model(seed=1)])
    model.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "members" / "expert1" / "model.safetensors").is_file()
    cls.from_pretrained(tmp_path / "c")


def test_one_config_base_counts_the_members():
    assert issubclass(BTMConfig, MemberSetConfig) and issubclass(RoutedConfig, MemberSetConfig)
    base = tiny_model().config.to_dict()
    members = [{"name": n, "path": None, "sha256": None} for n in ("seed", "a", "b")]
    assert BTMConfig(base_config=base, members=members).num_members == 3
    routed = RoutedConfig(base_config=base, members=members)
    assert routed.num_members == 3 and routed.num_hidden_layers == routed.base_config.num_hidden_layers
    assert BTMConfig(base_config=base, members=members).num_hidden_layers == 3 * routed.num_hidden_layers


def test_not_a_saved_composite(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 1)
    RoutedModel.from_members([hub, *experts]).save_pretrained(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").unlink()
    with pytest.raises(BTSError, match="is not a saved routed model \\(no router.safetensors\\)"):
        RoutedModel.from_pretrained(tmp_path / "r")
    with pytest.raises(BTSError, match="is not a saved BTM ensemble \\(no config.json\\)"):
        BTMEnsemble.from_pretrained(tmp_path / "nothing")


def test_the_stitched_model_uses_the_same_manifest(tmp_path):
    """BTSForCausalLM's save/load and the composites' are one implementation: same manifest, same refusal."""
    hub, experts = _members_inside(tmp_path)
    BTSForCausalLM.from_members(hub, experts, num_stitches=1).save_pretrained(tmp_path / "folder")
    btm_dir = tmp_path / "btm"
    BTMEnsemble.from_members([hub, *experts]).save_pretrained(btm_dir)
    stitched = json.loads((tmp_path / "folder" / "config.json").read_text())["members"]
    ensemble = json.loads((btm_dir / "config.json").read_text())["members"]
    assert [m["sha256"] for m in stitched] == [m["sha256"] for m in ensemble]
    assert [m["path"] for m in stitched] == ["members/hub", "members/e0", "members/e1"]
    tiny_model(seed=7).save_pretrained(experts[0])
    for cls, folder in ((BTSForCausalLM, tmp_path / "folder"), (BTMEnsemble, btm_dir)):
        with pytest.raises(BTSError, match="has changed since the model was saved"):
            cls.from_pretrained(folder)
