from importlib import resources

import pytest

from edgeq.devices.base import why_not
from edgeq.devices.local import LocalDevice
from edgeq.errors import UserError
from edgeq.recipe import Exclusions, Recipe
from edgeq.target import bundled_target_names, load_target


def test_bundled_targets_load_with_their_signedness():
    assert {"x86-64", "x86-avx512-vnni", "aarch64"} <= set(bundled_target_names())
    assert load_target("x86-avx512-vnni").quantization.activations == "uint8"
    assert load_target("aarch64").quantization.activations == "int8"
    assert load_target("x86-64").quantization.reduce_range


def test_cross_architecture_target_is_not_measured_here():
    why = LocalDevice().check(load_target("aarch64"))
    assert "aarch64" in why


def test_user_target_file(tmp_path):
    bundled = resources.files("edgeq.targets").joinpath("x86-64.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(bundled.replace('name = "x86-64"', 'name = "mine"'))
    assert load_target(str(path)).name == "mine"


@pytest.mark.parametrize("content, message", [("name = ", "not valid TOML"), ('name = "x"\narch = "x86_64"', "lacks")])
def test_bad_target_files(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_target(str(path))


def test_unknown_target_names_the_choices():
    with pytest.raises(UserError, match="unknown target 'nope'.*x86-64"):
        load_target("nope")


def test_exclusion_specs_parse():
    ex = Exclusions.parse(["conv1", "name:fc", "re:^blk", "op:Add"])
    assert ex.names == ("conv1", "fc") and ex.patterns == ("^blk",) and ex.op_types == ("Add",)
    with pytest.raises(UserError):
        Exclusions.parse(["bogus:x"])


def test_recipe_round_trips_and_validates():
    recipe = Recipe(method="entropy", exclude=Exclusions(names=("a",)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(UserError):
        Recipe(method="magic")


def test_cpu_flags_decide_what_is_measured_here_and_whether_int8_accuracy_is_faithful(monkeypatch):
    import edgeq.target as target_module

    monkeypatch.setattr(target_module, "host_arch", lambda: "x86_64")
    monkeypatch.setattr(target_module, "host_cpu_flags", lambda wanted: {"avx2", "fma"})  # an AVX2 CPU
    avx2_cpu = LocalDevice().facts() | {"arch": "x86_64", "cpu_flags": ["avx2", "fma"]}
    vnni, avx2 = load_target("x86-avx512-vnni"), load_target("x86-64")
    assert "lacks avx512_vnni" in why_not(avx2_cpu, vnni, "onnxruntime")
    assert why_not(avx2_cpu, avx2, "onnxruntime") == ""
    assert "no VNNI" in vnni.int8_caveat_here() and "no VNNI" in load_target("jetson-orin").int8_caveat_here()
    assert avx2.int8_caveat_here() == ""  # 7-bit weights do not overflow AVX2's 16-bit pair sums
    monkeypatch.setattr(target_module, "host_cpu_flags", lambda wanted: {"avx2", "fma", "avx512_vnni"})
    vnni_cpu = avx2_cpu | {"cpu_flags": ["avx2", "fma", "avx512_vnni"]}
    assert why_not(vnni_cpu, vnni, "onnxruntime") == "" and vnni.int8_caveat_here() == ""
    gpu = load_target("gpu-ampere")
    assert f"{gpu.onnxruntime.providers[0]} is not available" in why_not(vnni_cpu, gpu, "onnxruntime")
    assert "no ONNX Runtime" in why_not(vnni_cpu | {"onnxruntime": None}, vnni, "onnxruntime")
