!> Lorenz-96 host model coupled to lodas, decomposed over the ranks of its own communicator.
!>
!>   dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,   i = 1..n (periodic),  RK4 with step dt.
!>
!> Usage: mpiexec -n A l96_host FILE.nml : -n B python -m coupler run FILE.nml
!> Reads &l96_nml (its own group); the bridge reads &bridge_nml. Rank r of A owns
!> x(r*n/A+1 : (r+1)*n/A) with a halo of 2 on the left and 1 on the right.
!> The operation order is that of coupler/models/lorenz96.py, so the two agree to round-off
!> and any number of ranks gives bit-identical results.
program l96_host
   use mpi
   use lodas_bridge
   use host_utils, only: state_file_io, host_stop, host_log
   implicit none

   integer, parameter :: dp = lodas_dp
   ! &l96_nml (the same keys as bridges/namelist.py L96Nml)
   integer :: n = 40, steps_per_cycle = 1, n_cycles = 100
   real(dp) :: forcing = 8.0_dp, dt = 0.05_dp
   character(len=512) :: init_file = '', final_file = ''
   namelist /l96_nml/ n, forcing, dt, steps_per_cycle, n_cycles, init_file, final_file

   type(lodas_ctx) :: ctx
   integer :: comm, rank, nranks, ierr, status, nl, i0, step, cycle, k, iau_k, unit, ios
   integer :: starts(2, 1), counts(2, 1), left, right
   real(dp), allocatable :: x(:), inc(:)
   character(len=512) :: nml_file, iomsg
   character(len=LODAS_MSG_LEN) :: msg

   call MPI_Init(ierr)
   call get_command_argument(1, nml_file)
   call lodas_init(ctx, trim(nml_file), MPI_COMM_WORLD, comm, status, msg)
   if (status /= LODAS_OK) call host_stop(ctx, 0, msg)
   call MPI_Comm_rank(comm, rank, ierr)
   call MPI_Comm_size(comm, nranks, ierr)

   open (newunit=unit, file=trim(nml_file), status='old', action='read', iostat=ios, iomsg=iomsg)
   if (ios == 0) read (unit, nml=l96_nml, iostat=ios, iomsg=iomsg)
   if (ios /= 0) call host_stop(ctx, rank, trim(nml_file)//': &l96_nml: '//trim(iomsg))
   close (unit)
   if (mod(n, nranks) /= 0 .or. n/nranks < 2) then
      write (msg, '(a,i0,a,i0,a)') '&l96_nml n = ', n, ' cannot be split over ', nranks, &
         ' host ranks: n must be a multiple of the ranks, with at least 2 points each'
      call host_stop(ctx, rank, msg)
   end if
   if (trim(ctx%increment_mode) == 'iau' .and. ctx%iau_steps > steps_per_cycle) then
      write (msg, '(a,i0,a,i0,a)') '&bridge_nml iau_steps = ', ctx%iau_steps, &
         ' exceeds &l96_nml steps_per_cycle = ', steps_per_cycle, ': the IAU window must end before the next analysis'
      call host_stop(ctx, rank, msg)
   end if
   nl = n/nranks
   i0 = rank*nl
   starts(:, 1) = [i0 + 1, 1]
   counts(:, 1) = [nl, 1]
   call lodas_define_decomposition(ctx, 'l96', ['x'], n, 1, starts, counts, status, msg)
   if (status /= LODAS_OK) call host_stop(ctx, rank, msg)
   left = modulo(rank - 1, nranks)
   right = modulo(rank + 1, nranks)

   allocate (x(-1:nl + 1), inc(nl))
   if (len_trim(init_file) > 0) then
      call state_file_io(comm, trim(init_file), .false., n, 1, starts, counts, x(1:nl), ios, msg)
      if (ios /= 0) call host_stop(ctx, rank, '&l96_nml init_file: '//msg)
   else
      x(1:nl) = forcing
      if (i0 < 20 .and. 20 <= i0 + nl) x(20 - i0) = forcing + 0.01_dp
   end if

   step = 0
   iau_k = huge(1)
   inc = 0.0_dp
   do cycle = 1, n_cycles
      do k = 1, steps_per_cycle
         call rk4_step(x)
         step = step + 1
         if (iau_k < ctx%iau_steps) then        ! forward IAU: constant weight over the window
            iau_k = iau_k + 1
            x(1:nl) = x(1:nl) + lodas_iau_weight(ctx, iau_k)*inc
         end if
      end do
      call lodas_put_background(ctx, x(1:nl), step, step*dt, status, msg)
      if (status == LODAS_OK) call lodas_get_increment(ctx, inc, status, msg)
      if (status /= LODAS_OK) then
         call host_log(rank, 'l96_host: '//msg)
         if (trim(ctx%on_failure) == 'abort') call lodas_fail(ctx, msg)
         inc = 0.0_dp
      else if (trim(ctx%increment_mode) == 'direct') then
         x(1:nl) = x(1:nl) + inc
      else
         iau_k = 0
      end if
   end do

   if (len_trim(final_file) > 0) then
      call state_file_io(comm, trim(final_file), .true., n, 1, starts, counts, x(1:nl), ios, msg)
      if (ios /= 0) call host_log(rank, 'l96_host: &l96_nml final_file: '//msg)
   end if
   call lodas_finalize(ctx, status, msg)
   if (status /= LODAS_OK) call host_log(rank, 'l96_host: '//msg)
   call MPI_Comm_free(comm, ierr)
   call MPI_Finalize(ierr)

contains

   !> Fill the halo x(-1:0) and x(nl+1) from the periodic neighbours.
   subroutine halo(y)
      real(dp), intent(inout) :: y(-1:)
      call MPI_Sendrecv(y(nl - 1), 2, MPI_DOUBLE_PRECISION, right, 1, y(-1), 2, MPI_DOUBLE_PRECISION, &
                        left, 1, comm, MPI_STATUS_IGNORE, ierr)
      call MPI_Sendrecv(y(1), 1, MPI_DOUBLE_PRECISION, left, 2, y(nl + 1), 1, MPI_DOUBLE_PRECISION, &
                        right, 2, comm, MPI_STATUS_IGNORE, ierr)
   end subroutine halo

   !> d = (x(i+1) - x(i-2)) x(i-1) - x(i) + F on the owned points (halo must be current).
   subroutine tendency(y, d)
      real(dp), intent(inout) :: y(-1:)
      real(dp), intent(out) :: d(:)
      integer :: i
      call halo(y)
      do i = 1, nl
         d(i) = (y(i + 1) - y(i - 2))*y(i - 1) - y(i) + forcing
      end do
   end subroutine tendency

   !> Classical RK4: x + dt/6 (k1 + 2 k2 + 2 k3 + k4).
   subroutine rk4_step(y)
      real(dp), intent(inout) :: y(-1:)
      real(dp) :: k1(nl), k2(nl), k3(nl), k4(nl), w(-1:nl + 1)
      call tendency(y, k1)
      w(1:nl) = y(1:nl) + (0.5_dp*dt)*k1
      call tendency(w, k2)
      w(1:nl) = y(1:nl) + (0.5_dp*dt)*k2
      call tendency(w, k3)
      w(1:nl) = y(1:nl) + dt*k3
      call tendency(w, k4)
      y(1:nl) = y(1:nl) + (dt/6.0_dp)*(k1 + 2.0_dp*k2 + 2.0_dp*k3 + k4)
   end subroutine rk4_step

end program l96_host
