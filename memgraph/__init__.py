"""memgraph: a torch.compile backend that plans the whole training graph for memory-lean fine-tuning."""
from __future__ import annotations

from memgraph import config
from memgraph.options import Options

__version__ = "0.1.0"

__all__ = ["Options", "config", "__version__"]

from memgraph.api import partitioner, plan  # noqa: E402
from memgraph.plan import Plan  # noqa: E402
from memgraph.pipeline import compiled_graphs  # noqa: E402
from memgraph.quantize import quantize_  # noqa: E402
from memgraph.embeddings import offload_embeddings_  # noqa: E402
from memgraph.compare import compare  # noqa: E402
from memgraph.graph_io import load_graph, save_graph  # noqa: E402
from memgraph.fit import fit  # noqa: E402

__all__ += ["partitioner", "plan", "Plan", "compiled_graphs", "quantize_", "offload_embeddings_", "compare", "load_graph", "save_graph",
            "fit"]

from memgraph.integrations import register_with_accelerate as _register_with_accelerate  # noqa: E402

_register_with_accelerate()
