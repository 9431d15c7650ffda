"""Generic utilities with no knowledge of VMs: background task supervision,
lifecycle states, progress lines, unix socket probes."""
