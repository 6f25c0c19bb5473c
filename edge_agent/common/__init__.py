"""What both sides share below the protocol: the MQTT link, blob transfer and storage, child processes."""
