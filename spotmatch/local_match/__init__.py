"""Local matching: keypoints inside the animal mask, matched and verified per image pair.

Extractors by name (`EXTRACTORS`: rootsift, disk, aliked, xfeat; plus the detector-free `loftr`),
`Features` cached per image, `Matcher.match(f0, f1) -> PairEvidence`, `LocalMatcher` to stream pairs.
"""
from spotmatch.local_match.extractors import EXTRACTORS, Extractor, create_extractor
from spotmatch.local_match.features import FeatureCache, Features
from spotmatch.local_match.matchers import MATCHERS, Matcher, PairEvidence, VerificationConf, create_matcher
from spotmatch.local_match.pipeline import LocalMatcher, PairScorer

__all__ = [
    "EXTRACTORS",
    "MATCHERS",
    "Extractor",
    "FeatureCache",
    "Features",
    "LocalMatcher",
    "Matcher",
    "PairEvidence",
    "PairScorer",
    "VerificationConf",
    "create_extractor",
    "create_matcher",
]
