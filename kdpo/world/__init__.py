"""The project's built-in knowledge world (see :mod:`kdpo.world.build`)."""
from kdpo.world.build import (
    World, WorldConfig, build_world, cache_root, default_world, model_corpus,
    recall_shortfall, world_config,
)

__all__ = ["World", "WorldConfig", "build_world", "cache_root", "default_world", "model_corpus", "recall_shortfall",
           "world_config"]
