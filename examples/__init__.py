"""Example handlers for netserver: echo, daytime and the Eliza chatbot."""
