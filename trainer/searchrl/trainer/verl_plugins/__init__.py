"""verl plug-ins: the ``searchrl_research`` AgentLoop and the ``SearchRLSearchTool`` search tool.

Importing this package registers the agent loop with verl (``@register("searchrl_research")``). verl itself imports
the classes from the config files ``trainer/searchrl/trainer/config/agent_loops.yaml`` and ``trainer/searchrl/trainer/config/tools/searchrl_search.yaml``.
"""

from searchrl.trainer.verl_plugins.agent_loop import SearchRLResearchAgentLoop, VerlServerBackend
from searchrl.trainer.verl_plugins.search_tool import SearchRLSearchTool

__all__ = ["SearchRLResearchAgentLoop", "SearchRLSearchTool", "VerlServerBackend"]
