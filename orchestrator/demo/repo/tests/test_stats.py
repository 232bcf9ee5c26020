import unittest

from stats import mean


class MeanTest(unittest.TestCase):
    def test_mean(self) -> None:
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)

    def test_empty(self) -> None:
        with self.assertRaises(ValueError):
            mean([])
