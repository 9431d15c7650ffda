"""Configuration loading and validation: every bad value names its dotted key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmfactory.config import (
    DEFAULT_CONFIG, Config, ImageConfig, PathsConfig, TimeoutsConfig, VmConfig, build, load_config,
    scratch_config, to_toml,
)
from vmfactory.errors import ConfigError, VmFactoryError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmfactory.toml"
    path.write_text(text)
    return path


def config_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value


# --- defaults and overriding -------------------------------------------------------

def test_defaults_load() -> None:
    assert DEFAULT_CONFIG.is_file()
    cfg = load_config()
    assert cfg == Config()  # the embedded file and the dataclass defaults agree
    assert cfg.vm.cpus == 1 and cfg.vm.memory_mib == 256 and cfg.vm.accel == "auto"
    assert cfg.timeouts.agent_ready == 90.0
    assert cfg.image == ImageConfig("", "", "")


def test_user_file_overrides_only_what_it_sets(tmp_path: Path) -> None:
    path = write(tmp_path, """
[vm]
cpus = 2
accel = "tcg"

[timeouts]
agent_ready = 30

[paths]
state_dir = "/srv/vmf"
""")
    cfg = load_config(path)
    assert cfg.vm.cpus == 2 and cfg.vm.accel == "tcg"
    assert cfg.vm.memory_mib == 256 and cfg.vm.max_cpus == 4  # untouched defaults
    assert cfg.timeouts.agent_ready == 30.0 and isinstance(cfg.timeouts.agent_ready, float)
    assert cfg.timeouts.agent_call == 10.0
    assert cfg.paths.state_dir == Path("/srv/vmf")
    assert cfg.paths.run_dir == Path("/run/vmfactory")


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[vm]\ncpus = 2\nmemory_mib = 512\n")
    cfg = load_config(path, overrides={"vm": {"cpus": 3}})
    assert cfg.vm.cpus == 3 and cfg.vm.memory_mib == 512


def test_empty_user_file_is_the_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == load_config()


def test_path_fields_become_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[paths]\nrun_dir = "relative/run"\n'))
    assert isinstance(cfg.paths.state_dir, Path)
    assert cfg.paths.run_dir == Path("relative/run") and isinstance(cfg.paths.run_dir, Path)


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.vm.cpus = 8  # type: ignore[misc]


# --- unknown keys -------------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("[vm]\nbogus = 1\n", "vm.bogus"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("top_level = 1\n", "top_level"),
    ("[timeouts]\nagent_redy = 5.0\n", "timeouts.agent_redy"),
])
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    err = config_error(path=write(tmp_path, text))
    assert err.key == key
    assert key in str(err) and "unknown key" in str(err)


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    err = config_error(path=write(tmp_path, "vm = 3\n"))
    assert err.key == "vm" and "table" in str(err)


# --- types --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, needle", [
    ({"vm": {"cpus": "2"}}, "vm.cpus", "expected int, got str"),
    ({"vm": {"cpus": True}}, "vm.cpus", "expected int, got bool"),
    ({"vm": {"memory_mib": 512.0}}, "vm.memory_mib", "expected int, got float"),
    ({"timeouts": {"agent_call": True}}, "timeouts.agent_call", "expected float, got bool"),
    ({"timeouts": {"agent_call": "5"}}, "timeouts.agent_call", "expected float, got str"),
    ({"vm": {"qemu": 1}}, "vm.qemu", "expected str, got int"),
    ({"image": {"kernel": ["a"]}}, "image.kernel", "expected str, got list"),
    ({"paths": {"state_dir": 7}}, "paths.state_dir", "path string"),
    ({"paths": {"run_dir": ""}}, "paths.run_dir", "path string"),
])
def test_wrong_type_is_named(overrides: dict, key: str, needle: str) -> None:
    err = config_error(overrides=overrides)
    assert err.key == key
    assert needle in str(err)


def test_wrong_type_from_toml(tmp_path: Path) -> None:
    err = config_error(path=write(tmp_path, '[vm]\ncpus = "two"\n'))
    assert err.key == "vm.cpus" and "'two'" in str(err)


def test_int_is_accepted_for_float() -> None:
    assert load_config(overrides={"timeouts": {"shutdown": 3}}).timeouts.shutdown == 3.0


@pytest.mark.parametrize("value", ["qemu", "KVM", "", 1])
def test_bad_accel_lists_the_choices(value: Any) -> None:
    err = config_error(overrides={"vm": {"accel": value}})
    assert err.key == "vm.accel"
    for choice in ("'auto'", "'kvm'", "'tcg'"):
        assert choice in str(err)


@pytest.mark.parametrize("value", ["auto", "kvm", "tcg"])
def test_good_accel(value: str) -> None:
    assert load_config(overrides={"vm": {"accel": value}}).vm.accel == value


# --- ranges -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"vm": {"memory_mib": -1}}, "vm.memory_mib"),
    ({"vm": {"memory_mib": 64}}, "vm.memory_mib"),
    ({"vm": {"cpus": 0}}, "vm.cpus"),
    ({"vm": {"cpus": 65, "max_cpus": 65}}, "vm.cpus"),
    ({"vm": {"cpus": 4, "max_cpus": 2}}, "vm.max_cpus"),
    ({"vm": {"memory_mib": 1024, "max_memory_mib": 512}}, "vm.max_memory_mib"),
    ({"timeouts": {"agent_ready": 0}}, "timeouts.agent_ready"),
    ({"timeouts": {"shutdown": -1.0}}, "timeouts.shutdown"),
    ({"timeouts": {"kvm_probe": 3601}}, "timeouts.kvm_probe"),
    ({"timeouts": {"qmp_command": float("nan")}}, "timeouts.qmp_command"),
    ({"timeouts": {"agent_call": float("inf")}}, "timeouts.agent_call"),
    ({"template": {"standby": 9}}, "template.standby"),
    ({"template": {"standby": -1}}, "template.standby"),
])
def test_out_of_range_is_named(overrides: dict, key: str) -> None:
    err = config_error(overrides=overrides)
    assert err.key == key
    assert "out of range" in str(err)


def test_range_boundaries_are_inclusive() -> None:
    cfg = load_config(overrides={"vm": {"cpus": 64, "max_cpus": 64, "memory_mib": 128},
                                 "timeouts": {"agent_call": 0.01, "agent_ready": 3600}})
    assert cfg.vm.cpus == cfg.vm.max_cpus == 64 and cfg.vm.memory_mib == 128


def test_max_cpus_equal_to_cpus_is_fine() -> None:
    assert load_config(overrides={"vm": {"cpus": 4, "max_cpus": 4}}).vm.max_cpus == 4


def test_dataclasses_validate_on_direct_construction() -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(cpus=2, max_cpus=1)
    assert info.value.key == "vm.max_cpus"
    with pytest.raises(ConfigError) as info:
        TimeoutsConfig(agent_call=0)
    assert info.value.key == "timeouts.agent_call"


# --- files --------------------------------------------------------------------------

def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[vm\ncpus = 2\n")
    err = config_error(path=path)
    assert err.key == str(path)
    assert "invalid TOML" in str(err)


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    err = config_error(path=write(tmp_path, "[vm]\ncpus = 1\ncpus = 2\n"))
    assert "invalid TOML" in str(err)


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = config_error(path=path)
    assert err.key == str(path)
    assert "file not found" in str(err)


def test_config_error_is_a_vmfactory_error() -> None:
    err = config_error(overrides={"vm": {"cpus": 0}})
    assert isinstance(err, VmFactoryError)
    assert str(err).startswith("config vm.cpus:")


def test_build_rejects_non_table_root() -> None:
    with pytest.raises(ConfigError) as info:
        build(Config, [])  # type: ignore[arg-type]
    assert info.value.key == "<root>"


def test_build_single_section() -> None:
    assert build(PathsConfig, {"state_dir": "/x"}, "paths.") == PathsConfig(state_dir=Path("/x"))


def test_scratch_config_keeps_everything_under_root(tmp_path: Path) -> None:
    path = scratch_config(tmp_path, {"vm": {"accel": "tcg"},
                                     "pools": [{"name": "p", "min_size": 1, "max_size": 1}]})
    assert path == tmp_path / "vmfactory.toml"
    config = load_config(path)
    assert config.paths.run_dir == tmp_path / "run"
    assert config.paths.template_dir == tmp_path / "templates"
    assert config.daemon.socket == tmp_path / "factory.sock"
    assert config.store.url == f"file://{tmp_path / 'store'}"
    assert config.runtime.store == f"file://{tmp_path / 'client'}"
    assert config.vm.accel == "tcg" and [p.name for p in config.pools] == ["p"]
    # The file is complete, not a fragment: it equals what the daemon reports.
    assert path.read_text() == to_toml(config)


def test_scratch_config_rejects_bad_overrides_without_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        scratch_config(tmp_path, {"daemon": {"refill_concurrency": 0}})
    assert info.value.key == "daemon.refill_concurrency"
    assert not (tmp_path / "vmfactory.toml").exists()
