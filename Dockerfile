# syntax=docker/dockerfile:1

# Build: a static, trimmed binary. CI runs the same go build command (see
# cmd/entra-redis-proxy/manifests_test.go), so keep it on one RUN line.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/entra-redis-proxy ./cmd/entra-redis-proxy

# Run: distroless static (no shell, no package manager), as the numeric nonroot user so that
# Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="entra-redis-proxy" \
      org.opencontainers.image.description="Sidecar that lets applications reach Azure Cache for Redis with Microsoft Entra ID authentication, re-authenticating live connections as tokens rotate" \
      org.opencontainers.image.source="https://github.com/entra-redis-proxy/entra-redis-proxy" \
      org.opencontainers.image.url="https://github.com/entra-redis-proxy/entra-redis-proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/static-debian12:nonroot"
COPY --from=build /out/entra-redis-proxy /entra-redis-proxy
USER 65532:65532
ENTRYPOINT ["/entra-redis-proxy"]
