"""Configuration: one definition per field, the global seed is every stage's default seed."""

from __future__ import annotations

import ast
import inspect

import pytest

from yokai_pipeline import config
from yokai_pipeline.config import PipelineConfig


def test_no_field_is_defined_twice():
    # pydantic keeps the last of two same-named class attributes silently; the source must not have any
    tree = ast.parse(inspect.getsource(config))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        names = [
            s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        ]
        assert len(names) == len(set(names)), (cls.name, sorted(n for n in names if names.count(n) > 1))


def test_global_seed_is_the_default_of_every_stage_seed():
    cfg = PipelineConfig.model_validate({"seed": 7})
    assert (cfg.clustering.seed, cfg.augment.seed, cfg.packaging.seed) == (7, 7, 7)
    # an explicit stage seed wins
    cfg = PipelineConfig.model_validate({"seed": 7, "augment": {"seed": 2, "intensity": "heavy"}})
    assert (cfg.clustering.seed, cfg.augment.seed, cfg.packaging.seed) == (7, 2, 7)
    assert cfg.augment.intensity == "heavy"
    # round trip (config.json) keeps the values; default seed stays 0
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert PipelineConfig().packaging.seed == 0
    assert PipelineConfig(seed=3, packaging=config.PackagingConfig()).packaging.seed == 3
    assert PipelineConfig(seed=3, packaging=config.PackagingConfig(seed=1)).packaging.seed == 1


def test_episode_ids_that_clash_are_refused(tmp_path):
    from flows.pipeline import list_episodes
    from yokai_pipeline.errors import YokaiError

    (tmp_path / "ep01.mp4").write_bytes(b"x")
    (tmp_path / "ep02.mp4").write_bytes(b"x")
    assert [p.name for p in list_episodes(tmp_path)] == ["ep01.mp4", "ep02.mp4"]
    (tmp_path / "ep01.mkv").write_bytes(b"x")
    with pytest.raises(YokaiError, match=r"ep01\.mkv and ep01\.mp4 -> 'ep01'"):
        list_episodes(tmp_path)
