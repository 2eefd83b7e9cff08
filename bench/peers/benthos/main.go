// Command benthos-peer is Benthos v4.27.0 with only the components the peer benchmark
// of fileserver uses (bench/peers.py): Kafka (franz-go) in, the HTTP processor, S3 and
// SQL (Postgres through lib/pq) out, bloblang, switch/broker, Prometheus metrics.
package main

import (
	"context"

	_ "github.com/benthosdev/benthos/v4/public/components/aws"
	_ "github.com/benthosdev/benthos/v4/public/components/io"
	_ "github.com/benthosdev/benthos/v4/public/components/kafka"
	_ "github.com/benthosdev/benthos/v4/public/components/prometheus"
	_ "github.com/benthosdev/benthos/v4/public/components/pure"
	_ "github.com/benthosdev/benthos/v4/public/components/sql/base"
	"github.com/benthosdev/benthos/v4/public/service"

	_ "github.com/lib/pq"
)

func main() {
	service.RunCLI(context.Background())
}
