"""The world build as a Prefect task, cached by its inputs (see :func:`tasks.caching.world_cache_key`)."""
from __future__ import annotations

from prefect import get_run_logger, task

from kdpo.world import World, WorldConfig, build_world
from tasks.caching import world_cache_key


@task(name="build-world", cache_key_fn=world_cache_key, persist_result=True)
def build_world_task(config: WorldConfig | None = None) -> World:
    """Build (or load from ``$KDPO_HOME/worlds``) the world of the shipped fact table."""
    logger = get_run_logger()
    logger.info("building the knowledge world, or loading it from disk (the first build takes minutes on a CPU)")
    world = build_world(config, progress=False)
    how = "loaded from disk" if world.info["cached"] else f"built in {world.info['seconds']} s"
    logger.info("world %s: %s, recall %s", world.path, how, world.info["recall"])
    return world


def cached_world(config: WorldConfig | None = None) -> World:
    """The world through Prefect's cache; built again if the cached record names a directory now gone."""
    world = build_world_task(config)
    if not (world.path / "world.json").exists():
        world = build_world_task.with_options(refresh_cache=True)(config)
    return world
