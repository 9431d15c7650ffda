"""Everything that goes into the VM: the image builder and the guest agent."""
