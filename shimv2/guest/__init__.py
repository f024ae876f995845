"""The guest agent: runs inside each pod's VM and serves Kata's agent API over ttrpc."""
