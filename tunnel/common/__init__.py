"""Code both roles share, by layer: proto/ (pure core), aio/ (asyncio), config/, errors."""
