"""Local stand-ins for the email providers, speaking their documented wire behaviour."""
