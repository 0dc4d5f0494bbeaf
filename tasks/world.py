"""The world build as a Prefect task. Its one cache is the builder's own: ``$KDPO_HOME/worlds/KEY``, keyed by
the world's inputs (:func:`kdpo.world.build.world_key`), loaded instead of built when it is there."""
from __future__ import annotations

from prefect import get_run_logger, task

from kdpo.world import World, WorldConfig, build_world


@task(name="build-world")
def build_world_task(config: WorldConfig | None = None) -> World:
    """Build (or load from ``$KDPO_HOME/worlds``) the world of the shipped fact table."""
    logger = get_run_logger()
    logger.info("building the knowledge world, or loading it from disk (the first build takes minutes on a CPU)")
    world = build_world(config, progress=False)
    how = "loaded from disk" if world.info["cached"] else f"built in {world.info['seconds']} s"
    logger.info("world %s: %s, recall %s", world.path, how, world.info["recall"])
    return world
