"""Registers the `schema` that conf/config.yaml starts from, in every process where Hydra discovers
plugins. `pipeline.run` registers it itself; this is for composers that only read conf/, above all
DVC's `dvc exp run`, which looks for Hydra plugins in the repository root (its `hydra.plugins_path`)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from pipeline.config import register_configs

register_configs()


class FromlogitsSchema(SearchPathPlugin):
    """Hydra only imports modules that define a plugin; this one adds nothing to the search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        pass
