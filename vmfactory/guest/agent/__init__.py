"""The vmfactory guest agent: ttrpc services that run inside each VM.

It ships in the guest image together with ``vmfactory.proto``, ``vmfactory.ttrpc``
(standard library and protobuf only), ``vmfactory.errors`` (the root of its error tree, a module without imports) and
``vmfactory.util.states`` (the lifecycle guard, standard library only), and
imports nothing else from vmfactory, so keep it that way.
"""

AGENT_PORT_NAME = "vmfactory.agent"
"""Name of the virtio-serial port the host's agent channel is attached to."""
