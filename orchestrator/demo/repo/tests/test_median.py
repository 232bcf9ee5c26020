import unittest

import stats


class MedianTest(unittest.TestCase):
    def test_odd(self) -> None:
        self.assertEqual(stats.median([3, 1, 2]), 2)

    def test_even(self) -> None:
        self.assertEqual(stats.median([4, 1, 3, 2]), 2.5)

    def test_empty(self) -> None:
        with self.assertRaises(ValueError):
            stats.median([])
