"""spotguard: spot/preemptible VM notice handler for vLLM inference on Kubernetes."""

__version__ = "0.1.0"
