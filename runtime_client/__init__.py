"""What a container runtime embeds: a client of the vmfactory daemon (more to come)."""
