from dataclasses import dataclass, field

import pytest

from pipeline.config import ConfigError, load_config, parse_size


@dataclass
class Inner:
    k: int = 100
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    store: str = "out/store"
    image_size: tuple[int, int] = (480, 640)
    budget: str = "4G"
    ratio: float | None = None
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("store: s3://bucket/x\ninner:\n  k: 5\nimage_size: [272, 480]\n")
    cfg = load_config(Outer, p, ["inner.k=7", "flag=true", "inner.names=a,b", "ratio=0.5"])
    assert cfg.store == "s3://bucket/x"
    assert cfg.image_size == (272, 480)
    assert cfg.inner.k == 7 and cfg.inner.names == ["a", "b"]
    assert cfg.flag is True and cfg.ratio == 0.5


def test_unknown_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="inner.kk"):
        load_config(Outer, None, ["inner.kk=1"])
    with pytest.raises(ConfigError, match="inner.k"):
        load_config(Outer, None, ["inner.k=abc"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)


def test_parse_size():
    assert parse_size("4G") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GB") == int(1.5 * (1 << 30))
    assert parse_size(1024) == 1024
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_typed_values_win_and_are_not_reparsed():
    # A command-line path such as "on" or "1e5" stays a string; values win over --set overrides.
    cfg = load_config(Outer, None, ["store=from-set", "inner.k=3"], {"store": "1e5", "inner.k": 9,
                                                                    "image_size": [128, 160]})
    assert cfg.store == "1e5" and cfg.inner.k == 9 and cfg.image_size == (128, 160)


def test_renamed_key_is_read_with_a_warning(caplog):
    import logging

    from pipeline.mine import MineConfig

    with caplog.at_level(logging.WARNING):
        cfg = load_config(MineConfig, None, ["address=ray://head:10001", "queries=q", "output=o"])
    assert cfg.ray_address == "ray://head:10001"
    assert "'address' is deprecated; write 'ray_address'" in caplog.text
    with pytest.raises(ConfigError, match="both 'address' and 'ray_address'"):
        load_config(MineConfig, None, ["address=a", "ray_address=b"])


def test_use_gpu_words():
    from pipeline.config import parse_use_gpu

    assert [parse_use_gpu(v) for v in ("auto", "true", "False", True)] == ["auto", True, False, True]
    assert parse_use_gpu("no") is False and parse_use_gpu("yes") is True  # old spellings, warned
    with pytest.raises(ConfigError, match="use_gpu must be auto, true or false"):
        parse_use_gpu("maybe")
