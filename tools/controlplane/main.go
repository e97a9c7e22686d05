// Command spotguard-controlplane is one binary holding the real Kubernetes control plane that
// spotguard's simulation runs on: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// plus a small certificate generator. One binary instead of four because the three Kubernetes
// components share almost all their code: a single link is several minutes faster on a 2-core
// machine and the cache holds one file.
//
//	spotguard-controlplane etcd [etcd flags]
//	spotguard-controlplane kube-apiserver [flags]
//	spotguard-controlplane kube-controller-manager [flags]
//	spotguard-controlplane kube-scheduler [flags]
//	spotguard-controlplane certs DIR
//	spotguard-controlplane version
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream's kube-apiserver main does

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/version"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: spotguard-controlplane etcd|kube-apiserver|kube-controller-manager|kube-scheduler|certs|version [flags]")
		os.Exit(2)
	}
	component, args := os.Args[1], os.Args[2:]
	switch component {
	case "etcd":
		etcdmain.Main(append([]string{"etcd"}, args...))
	case "kube-apiserver":
		os.Exit(runCobra(apiserver.NewAPIServerCommand(), args))
	case "kube-controller-manager":
		os.Exit(runCobra(controllermanager.NewControllerManagerCommand(), args))
	case "kube-scheduler":
		os.Exit(runCobra(scheduler.NewSchedulerCommand(), args))
	case "certs":
		if len(args) != 1 {
			fmt.Fprintln(os.Stderr, "usage: spotguard-controlplane certs DIR")
			os.Exit(2)
		}
		if err := writeCertificates(args[0]); err != nil {
			fmt.Fprintln(os.Stderr, "certs:", err)
			os.Exit(1)
		}
	case "version":
		fmt.Println(version.Get().GitVersion)
	default:
		fmt.Fprintf(os.Stderr, "unknown component %q\n", component)
		os.Exit(2)
	}
}

func runCobra(command *cobra.Command, args []string) int {
	command.SetArgs(args)
	return cli.Run(command)
}
