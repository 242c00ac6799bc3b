package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
)

// subcommands are the words a command takes first.
var subcommands = map[string][]string{
	"node":       {"status", "stop"},
	"cache":      {"push", "pull", "verify", "keygen"},
	"completion": {"bash", "zsh", "fish"},
}

// completionFlag is one flag of a command, for a completion script.
type completionFlag struct{ name, usage string }

// commandFlags returns the flags command name parses, read from the flag
// set the command itself builds (env.describe), so the scripts cannot
// drift from the commands.
func commandFlags(name string) []completionFlag {
	if name == "completion" || name == "version" {
		return nil // no flags (and completion would describe itself)
	}
	var got []completionFlag
	e := &env{stdin: strings.NewReader(""), stdout: io.Discard, stderr: io.Discard, getenv: func(string) string { return "" }}
	e.describe = func(f *flags) {
		f.VisitAll(func(fl *flag.Flag) {
			usage, _, _ := strings.Cut(fl.Usage, "\n")
			got = append(got, completionFlag{fl.Name, usage})
		})
	}
	var args []string
	if subs := subcommands[name]; len(subs) > 0 {
		args = subs[:1] // node status, cache push: their flags are the subcommands'
	}
	err := commands[name].run(context.Background(), e, args)
	if err != nil && !errors.Is(err, errDescribed) {
		return nil
	}
	return got
}

func cmdCompletion(ctx context.Context, e *env, args []string) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintf(e.stdout, "usage: granary completion bash|zsh|fish\n\n%s.\n\n"+
			"bash: source <(granary completion bash)   (or save it in /etc/bash_completion.d/granary)\n"+
			"zsh:  source <(granary completion zsh)    (uses bashcompinit)\n"+
			"fish: granary completion fish > ~/.config/fish/completions/granary.fish\n", commands["completion"].short)
		return nil
	}
	if len(args) != 1 || !slices.Contains(subcommands["completion"], args[0]) {
		return usageErr("completion", "want one of bash, zsh, fish")
	}
	switch args[0] {
	case "bash":
		io.WriteString(e.stdout, bashCompletion())
	case "zsh":
		io.WriteString(e.stdout, "# granary completion for zsh, through bash's\nautoload -U +X bashcompinit && bashcompinit\n"+bashCompletion())
	case "fish":
		io.WriteString(e.stdout, fishCompletion())
	}
	return nil
}

func bashCompletion() string {
	var b strings.Builder
	b.WriteString(`# granary completion for bash: source <(granary completion bash)
_granary() {
	local cur=${COMP_WORDS[COMP_CWORD]} words=""
	if [ "$COMP_CWORD" -eq 1 ]; then
		COMPREPLY=($(compgen -W "` + strings.Join(commandOrder, " ") + ` help" -- "$cur"))
		return
	fi
	case ${COMP_WORDS[1]} in
`)
	for _, name := range commandOrder {
		var fs []string
		for _, f := range commandFlags(name) {
			fs = append(fs, "--"+f.name)
		}
		subs := strings.Join(subcommands[name], " ")
		fmt.Fprintf(&b, "\t%s)\n", name)
		if subs != "" {
			fmt.Fprintf(&b, "\t\tif [ \"$COMP_CWORD\" -eq 2 ]; then COMPREPLY=($(compgen -W %q -- \"$cur\")); return; fi\n", subs)
		}
		fmt.Fprintf(&b, "\t\twords=%q;;\n", strings.Join(fs, " "))
	}
	b.WriteString(`	help)
		words="` + strings.Join(commandOrder, " ") + `";;
	esac
	case $cur in
	-*) COMPREPLY=($(compgen -W "$words" -- "$cur"));;
	*) [ "${COMP_WORDS[1]}" = help ] && COMPREPLY=($(compgen -W "$words" -- "$cur"));;
	esac
}
complete -o default -F _granary granary
`)
	return b.String()
}

func fishCompletion() string {
	var b strings.Builder
	b.WriteString("# granary completion for fish: granary completion fish > ~/.config/fish/completions/granary.fish\n")
	all := strings.Join(append(slices.Clone(commandOrder), "help"), " ")
	fmt.Fprintf(&b, "complete -c granary -n 'not __fish_seen_subcommand_from %s' -f -a help -d 'print the help of a command'\n", all)
	for _, name := range commandOrder {
		fmt.Fprintf(&b, "complete -c granary -n 'not __fish_seen_subcommand_from %s' -f -a %s -d %s\n", all, name, fishQuote(commands[name].short))
		for _, sub := range subcommands[name] {
			fmt.Fprintf(&b, "complete -c granary -n '__fish_seen_subcommand_from %s; and not __fish_seen_subcommand_from %s' -f -a %s\n", name, strings.Join(subcommands[name], " "), sub)
		}
		for _, f := range commandFlags(name) {
			fmt.Fprintf(&b, "complete -c granary -n '__fish_seen_subcommand_from %s' -l %s -d %s\n", name, f.name, fishQuote(f.usage))
		}
	}
	fmt.Fprintf(&b, "complete -c granary -n '__fish_seen_subcommand_from help' -f -a %s\n", fishQuote(strings.Join(commandOrder, " ")))
	return b.String()
}

// fishQuote quotes s for fish, in single quotes.
func fishQuote(s string) string {
	return "'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", `\'`) + "'"
}
