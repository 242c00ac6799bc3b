// Command granary is the command line of Granary, a package store shared by
// the hosts of a build farm. All of its logic is in internal/cli; main only
// wires signals and maps errors to exit codes (0 ok, 1 error, 2 usage, 3
// package does not exist; `granary run` exits with its command's code).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/granary-build/granary/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cli.Run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if msg := cli.Message(err); msg != "" {
		fmt.Fprintln(os.Stderr, msg)
	}
	os.Exit(cli.ExitCode(err))
}
