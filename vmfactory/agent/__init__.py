"""Host side of the guest agent: a typed async client over the VM's agent channel."""

from vmfactory.agent.client import AgentClient

__all__ = ["AgentClient"]
