"""Host-side bookkeeping of the paged KV cache: which pages each decode slot owns.

The pool's pages are handed out on demand, a page at a time as a slot's sequence grows, and
returned the moment its slot is released, so the slots in flight hold pages for their live
tokens only. The page table (int32 [slots, max_pages]) is mirrored to the device before each
compiled call; entries a slot does not own hold `sentinel` (= the pool size), an out-of-bounds page
whose writes the device drops.
"""

from __future__ import annotations

import numpy as np


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-max(tokens, 0) // page_size)


class PageAllocator:
    """Pages 0..num_pages-1 among `slots` slots of at most `max_pages` pages each."""

    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages: int):
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.sentinel = num_pages
        self.table = np.full((slots, max_pages), self.sentinel, np.int32)
        self.owned = np.zeros(slots, np.int64)  # pages held per slot (a prefix of its row)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids go first
        self.version = 0  # bumped on every table change, so the device copy is refreshed lazily

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def missing(self, slot: int, tokens: int) -> int:
        """Pages `slot` still needs to hold `tokens` positions."""
        return max(0, min(pages_for(tokens, self.page_size), self.max_pages) - self.owned[slot])

    def ensure(self, slot: int, tokens: int) -> bool:
        """Gives `slot` pages for `tokens` positions; False (and nothing given) if too few are free."""
        need = self.missing(slot, tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            self.table[slot, self.owned[slot]] = self._free.pop()
            self.owned[slot] += 1
        self.version += need > 0
        return True

    def release(self, slot: int) -> None:
        """Returns every page of `slot` to the pool."""
        held = int(self.owned[slot])
        if held:
            self._free.extend(int(p) for p in self.table[slot, :held][::-1])
            self.table[slot, :] = self.sentinel
            self.owned[slot] = 0
            self.version += 1
