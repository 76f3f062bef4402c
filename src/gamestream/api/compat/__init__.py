"""The vendor SDKs' protocols as collector routes: Amplitude (`amplitude`), Segment (`segment`), PostHog
(`posthog`) and Snowplow (`snowplow`), each turning its wire format into gamestream events with the one mapping
of `gamestream.compat` and ingesting them through `http` (the guarantees of `POST /v1/events`); `routes` lists
them for the app. See docs/compat.md."""
