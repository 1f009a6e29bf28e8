"""The virtual machine a guest lives in: guest memory, memslots, vCPUs."""
